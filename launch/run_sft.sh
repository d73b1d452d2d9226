#!/usr/bin/env bash
# The sft stage under the deepspeed launcher; see launch/common.sh for NUM_GPUS, ZERO_STAGE, MASTER_PORT.
#   bash launch/run_sft.sh [--epochs 2 --batch_size 16 ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_stage sft "$@"
