#!/usr/bin/env bash
# One stage under ZeRO-0, 1, 2, 3, ZeRO-2/3 offload and FSDP2 for a fixed number of steps (same model, data, seed,
# global batch): results.md, results.json and results.png in out/compare_zero/<stage>/ (or --out).
#   bash launch/compare_zero.sh                       # pretrain, model small, 10 steps, every configuration
#   bash launch/compare_zero.sh sft --configs 2,fsdp --steps 20 --from_weight none
#   NUM_GPUS=8 bash launch/compare_zero.sh pretrain --model base
# Options: python -m bench.compare --help; other flags go to the stage script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi
exec python -m bench.compare "$@"
