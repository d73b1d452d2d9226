#!/usr/bin/env bash
# The whole chain on the embedded default: pretrain -> midtrain -> SFT -> DPO and the reward model (both from SFT's
# export) -> PPO (from SFT, rule reward on the demo's capitals prompts), each stage starting from an earlier
# stage's export under OUT_ROOT, then a table of every stage. GRPO runs too with WITH_GRPO=1. NUM_GPUS / ZERO_STAGE
# as in launch/common.sh. The per-stage flags below are the demo's (docs/results.md: how they were chosen); the
# batch sizes are per rank, for the 2 CPU ranks of a machine without GPU.
#   bash launch/run_pipeline.sh [extra flags for every stage]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_ROOT="${OUT_ROOT:-out}"
stages=(pretrain midtrain sft dpo reward ppo)
if [ "${WITH_GRPO:-0}" = 1 ]; then stages+=(grpo); fi
for stage in "${stages[@]}"; do
  echo "=== $stage ==="
  case "$stage" in
    # Packed rows and 3 epochs: the tiny model needs them to answer the task prompts at all.
    sft) stage_flags=(--packing packed --epochs 3 --batch_size 4 --learning_rate 1e-3) ;;
    ppo) stage_flags=(--reward rule --learning_rate 1e-3 --batch_size 8 --epochs 8 --max_steps 100
                      --eval_interval 20 --eval_batches 0) ;;
    grpo) stage_flags=(--reward rule --learning_rate 1e-3 --batch_size 4 --group_size 8 --epochs 4 --max_steps 100
                       --eval_interval 20 --eval_batches 0) ;;
    *) stage_flags=() ;;
  esac
  # --start_over: running the pipeline again moves each stage's earlier run aside (out/<stage>.<date-time>).
  bash "launch/run_${stage}.sh" --out_root "$OUT_ROOT" --start_over "${stage_flags[@]}" "$@"
done
PATH="$PWD/.venv/bin:$PATH" python -m train.summary "$OUT_ROOT" "${stages[@]}"
PATH="$PWD/.venv/bin:$PATH" python -m train.report "$OUT_ROOT" --stages "${stages[@]}"
