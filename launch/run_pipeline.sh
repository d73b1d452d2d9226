#!/usr/bin/env bash
# The whole chain on the embedded default: pretrain -> midtrain -> SFT -> DPO and the reward model (both from SFT's
# export) -> PPO (from SFT, scored by the reward model), each stage starting from an earlier stage's export under
# OUT_ROOT, then a table of every stage. GRPO runs too with WITH_GRPO=1. NUM_GPUS / ZERO_STAGE as in launch/common.sh.
#   bash launch/run_pipeline.sh [extra flags for every stage]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_ROOT="${OUT_ROOT:-out}"
stages=(pretrain midtrain sft dpo reward ppo)
if [ "${WITH_GRPO:-0}" = 1 ]; then stages+=(grpo); fi
for stage in "${stages[@]}"; do
  echo "=== $stage ==="
  case "$stage" in
    ppo) stage_flags=(--reward model --reward_model reward) ;;
    *) stage_flags=() ;;
  esac
  bash "launch/run_${stage}.sh" --out_root "$OUT_ROOT" "${stage_flags[@]}" "$@"
done
PATH="$PWD/.venv/bin:$PATH" python -m train.summary "$OUT_ROOT" "${stages[@]}"
