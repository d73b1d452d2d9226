# Shared by the launch/run_*.sh scripts: start a stage under the deepspeed launcher, or torchrun for FSDP.
#   BACKEND      deepspeed (default) | fsdp (PyTorch FSDP2 under torchrun; ZERO_STAGE is not read)
#   NUM_GPUS     ranks on this node (default: every GPU; 2 CPU processes when there is no GPU)
#   ZERO_STAGE   0 | 1 | 2 | 3 | 2_offload | 3_offload (default 2) -> ds_configs/zero${ZERO_STAGE}.json
#   MASTER_PORT  rendezvous port (default 29500)
# Extra arguments go to the stage script unchanged (they override its defaults and any --config YAML).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
if [ -x "$REPO_ROOT/.venv/bin/deepspeed" ]; then PATH="$REPO_ROOT/.venv/bin:$PATH"; fi

launch_stage() {
  local stage="$1"; shift
  if [ -n "${NUM_GPUS:-}" ] && ! [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "NUM_GPUS=${NUM_GPUS}: must be a whole number >= 1 (ranks on this node), or unset for every GPU" \
      "(2 CPU processes when there is no GPU)" >&2
    exit 2
  fi
  local gpus
  gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$gpus" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
    NUM_GPUS="${NUM_GPUS:-2}"
    # Split the cores between the ranks instead of letting each grab them all.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}"
  else
    NUM_GPUS="${NUM_GPUS:-$gpus}"
  fi
  case "${BACKEND:-deepspeed}" in
    fsdp)
      exec torchrun --nproc_per_node "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
        "train/${stage}.py" --backend fsdp "$@" ;;
    deepspeed)
      local ds_config="ds_configs/zero${ZERO_STAGE:-2}.json"
      [ -f "$ds_config" ] || { echo "ZERO_STAGE=${ZERO_STAGE}: no $ds_config (choices: $(ls ds_configs | tr '\n' ' '))" >&2; exit 2; }
      exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
        "train/${stage}.py" --deepspeed "$ds_config" "$@" ;;
    *) echo "BACKEND=${BACKEND}: use deepspeed or fsdp" >&2; exit 2 ;;
  esac
}
