# Shared by the launch/run_*.sh scripts: start a stage under the deepspeed launcher, or torchrun for FSDP.
#   BACKEND      deepspeed (default) | fsdp (PyTorch FSDP2 under torchrun; ZERO_STAGE is not read)
#   NUM_GPUS     ranks on this node (default: every GPU; 2 CPU processes when there is no GPU)
#   CUDA_VISIBLE_DEVICES  the GPUs to use (e.g. 2,3; NUM_GPUS=1 takes the first); the deepspeed launcher gets them
#                as --include localhost:2,3 (it ignores the variable beside --num_gpus)
#   ALLOW_CPU    1: run CPU ranks even though nvidia-smi lists GPUs that torch cannot use (otherwise an error)
#   ZERO_STAGE   0 | 1 | 2 | 3 | 2_offload | 3_offload -> ds_configs/zero${ZERO_STAGE}.json (default: the stage's
#                --deepspeed auto: ZeRO-0 on one rank, ZeRO-2 on more, a resume keeping the run's)
#   MASTER_PORT  rendezvous port (default 29500)
# Extra arguments go to the stage script unchanged (they override its defaults and any --config YAML).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
if [ -x "$REPO_ROOT/.venv/bin/deepspeed" ]; then PATH="$REPO_ROOT/.venv/bin:$PATH"; fi
source "$REPO_ROOT/launch/probe.sh"

# The deepspeed launcher's own INFO lines (its command, world info, every spawn and exit) and its single-node
# "no hostfile" warning are not the run's; its errors (a rank that died) stay. The stage's --verbose shows them all.
launcher_log_level() {
  local level=error previous=""
  for arg in "$@"; do
    case "$arg" in
      --verbose|--verbose=true|--verbose=1) level=info ;;
      --verbose=*) level=error ;;
      false|0) if [ "$previous" = --verbose ]; then level=error; fi ;;
    esac
    previous="$arg"
  done
  echo "$level"
}

launch_stage() {
  local stage="$1"; shift
  if [ -n "${NUM_GPUS:-}" ] && ! [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "NUM_GPUS=${NUM_GPUS}: must be a whole number >= 1 (ranks on this node), or unset for every GPU" \
      "(2 CPU processes when there is no GPU)" >&2
    exit 2
  fi
  local gpus
  gpus=$(usable_gpus) || exit 2
  if [ "$gpus" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
    NUM_GPUS="${NUM_GPUS:-2}"
    # Split the cores between the ranks instead of letting each grab them all.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}"
  else
    NUM_GPUS="${NUM_GPUS:-$gpus}"
    if [ "$NUM_GPUS" -gt "$gpus" ]; then
      echo "NUM_GPUS=$NUM_GPUS: torch sees only $gpus GPU(s)${CUDA_VISIBLE_DEVICES+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}; set NUM_GPUS <= $gpus or unset it" >&2
      exit 2
    fi
  fi
  case "${BACKEND:-deepspeed}" in
    fsdp)
      exec torchrun --nproc_per_node "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
        "train/${stage}.py" --backend fsdp "$@" ;;
    deepspeed)
      local ds_config=auto
      if [ -n "${ZERO_STAGE:-}" ]; then
        ds_config="ds_configs/zero${ZERO_STAGE}.json"
        [ -f "$ds_config" ] || { echo "ZERO_STAGE=${ZERO_STAGE}: no $ds_config (choices: $(ls ds_configs | tr '\n' ' '))" >&2; exit 2; }
      fi
      local ranks=(--num_gpus "$NUM_GPUS") devices
      if [ "$gpus" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        # The launcher drops CUDA_VISIBLE_DEVICES beside --num_gpus and takes GPUs 0..N-1; --include names the
        # devices (the launcher's own --include, when given neither flag, would take all of them, not NUM_GPUS).
        if ! [[ "$CUDA_VISIBLE_DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
          echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: the deepspeed launcher takes GPU indices (e.g. 2,3), not" \
            "UUIDs or MIG names; give indices, or use BACKEND=fsdp (torchrun keeps CUDA_VISIBLE_DEVICES as it is)" >&2
          exit 2
        fi
        IFS=, read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
        devices=("${devices[@]:0:NUM_GPUS}")
        ranks=(--include "localhost:$(IFS=,; echo "${devices[*]}")")
      fi
      exec deepspeed "${ranks[@]}" --log_level "$(launcher_log_level "$@")" --master_port "${MASTER_PORT:-29500}" \
        "train/${stage}.py" --deepspeed "$ds_config" "$@" ;;
    *) echo "BACKEND=${BACKEND}: use deepspeed or fsdp" >&2; exit 2 ;;
  esac
}
