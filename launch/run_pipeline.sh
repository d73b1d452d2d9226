#!/usr/bin/env bash
# The whole chain on the embedded default: pretrain -> midtrain -> SFT -> DPO and the reward model, each stage
# starting from the previous stage's export under OUT_ROOT (DPO and the reward model both from SFT's), then a table
# of every stage. NUM_GPUS / ZERO_STAGE as in launch/common.sh.
#   bash launch/run_pipeline.sh [extra flags for every stage]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_ROOT="${OUT_ROOT:-out}"
for stage in pretrain midtrain sft dpo reward; do
  echo "=== $stage ==="
  bash "launch/run_${stage}.sh" --out_root "$OUT_ROOT" "$@"
done
PATH="$PWD/.venv/bin:$PATH" python -m train.summary "$OUT_ROOT" pretrain midtrain sft dpo reward
