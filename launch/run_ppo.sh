#!/usr/bin/env bash
# The ppo stage under the deepspeed launcher; see launch/common.sh for NUM_GPUS, ZERO_STAGE, MASTER_PORT.
#   bash launch/run_ppo.sh [--reward model --reward_model reward --ppo_epochs 2 --from_weight DIR ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_stage ppo "$@"
