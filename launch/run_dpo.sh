#!/usr/bin/env bash
# The dpo stage under the deepspeed launcher; see launch/common.sh for NUM_GPUS, ZERO_STAGE, MASTER_PORT.
#   bash launch/run_dpo.sh [--beta 0.1 --dpo_loss ipo --from_weight DIR ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_stage dpo "$@"
