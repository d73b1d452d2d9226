#!/usr/bin/env bash
# Tokens/s and MFU of the same pretrain run under each ZeRO stage (same model, data, global batch, seed).
#   bash bench/zero_stages.sh            # MODEL=small STEPS=20 STAGES="0 1 2 3" NUM_GPUS=2 by default
# Prints the per-stage table from each run's summary.json (rates exclude warm-up, evaluation and saving).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL="${MODEL:-small}" STEPS="${STEPS:-20}" OUT_ROOT="${OUT_ROOT:-out/bench_zero}"
for zero in ${STAGES:-0 1 2 3}; do
  ZERO_STAGE="$zero" bash launch/run_pretrain.sh --model "$MODEL" --max_steps "$STEPS" --log_interval 5 \
    --eval_interval 0 --eval_batches 1 --save_interval 0 --batch_size 4 --max_seq_len 512 \
    --out_dir "$OUT_ROOT/zero$zero" "$@" > "$OUT_ROOT.zero$zero.log" 2>&1 || { tail -20 "$OUT_ROOT.zero$zero.log"; exit 1; }
done
.venv/bin/python -m train.summary "$OUT_ROOT" $(for z in ${STAGES:-0 1 2 3}; do echo "zero$z"; done)
