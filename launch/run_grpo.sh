#!/usr/bin/env bash
# The grpo stage under the deepspeed launcher; see launch/common.sh for NUM_GPUS, ZERO_STAGE, MASTER_PORT.
#   bash launch/run_grpo.sh [--group_size 4 --kl_coef 0.05 --from_weight DIR ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_stage grpo "$@"
