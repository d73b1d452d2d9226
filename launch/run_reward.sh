#!/usr/bin/env bash
# The reward stage under the deepspeed launcher; see launch/common.sh for NUM_GPUS, ZERO_STAGE, MASTER_PORT.
#   bash launch/run_reward.sh [--from_weight DIR --epochs 2 ...]  (the export, with its value head, serves PPO)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_stage reward "$@"
