# What the launch scripts ask of the machine they run on; sourced by launch/common.sh, launch/slurm/train.sbatch and
# launch/slurm/node.sh. Defines functions only.

# usable_gpus: prints how many GPUs torch can use here (within CUDA_VISIBLE_DEVICES). When nvidia-smi lists GPUs
# that torch cannot use (a CPU-only torch, a driver older than torch's CUDA), says so on stderr and returns 1
# instead of printing 0, unless ALLOW_CPU=1: the caller would otherwise start CPU ranks on a GPU machine.
usable_gpus() {
  local count listed
  count=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null) || count=""
  if [[ "$count" =~ ^[0-9]+$ ]] && [ "$count" -gt 0 ]; then echo "$count"; return 0; fi
  listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || listed=0
  if [ "$listed" -gt 0 ]; then
    local torch_says="torch.cuda.device_count() is 0"
    [ -n "$count" ] || torch_says="'import torch' fails"
    if [ "${ALLOW_CPU:-0}" != 1 ]; then
      echo "nvidia-smi lists $listed GPU(s) but torch cannot use them ($torch_says with $(command -v python || echo 'no python on PATH')${CUDA_VISIBLE_DEVICES+; CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES})." \
        "Install a torch built for this machine's CUDA driver (compare torch.version.cuda with the CUDA version" \
        "nvidia-smi prints), or set ALLOW_CPU=1 to run on CPU anyway" >&2
      return 1
    fi
    echo "ALLOW_CPU=1: running on CPU although nvidia-smi lists $listed GPU(s) ($torch_says)" >&2
  fi
  echo 0
}

# select_network_interface LOG MASTER_ADDR: exports GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, each one not already
# set, as the interface this host reaches MASTER_ADDR through (`ip route get`), and reports that in one line through
# the command LOG. Gloo otherwise binds to the address of the hostname, which is loopback on many hosts
# (127.0.1.1 in /etc/hosts): ranks on other nodes cannot reach it. A setting of the user's is kept and said so.
select_network_interface() {
  local log="$1" master="$2" addr route dev="" src="" line unset_help
  if [ -n "${GLOO_SOCKET_IFNAME:-}" ] && [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then
    "$log" "network: MASTER_ADDR=$master; GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME (both set by you)"
    return 0
  fi
  unset_help="set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface on the network between the nodes if start-up fails or hangs"
  if ! command -v ip > /dev/null; then
    "$log" "network: WARNING: no 'ip' command (iproute2) to find the interface towards MASTER_ADDR=$master; gloo and NCCL choose from the hostname: $unset_help"
    return 0
  fi
  addr="$master"
  if ! [[ "$master" =~ ^[0-9.]+$ || "$master" == *:* ]]; then
    addr=$(getent ahostsv4 "$master" 2>/dev/null || getent ahosts "$master" 2>/dev/null)
    addr="${addr%%[[:space:]]*}"
  fi
  if [ -z "$addr" ]; then
    "$log" "network: WARNING: MASTER_ADDR=$master does not resolve on this host; $unset_help"
    return 0
  fi
  if ! route=$(ip route get "$addr" 2>&1); then
    "$log" "network: WARNING: no route to MASTER_ADDR=$master ($addr): ${route//$'\n'/ }; $unset_help"
    return 0
  fi
  [[ "$route" =~ dev\ ([^ ]+) ]] && dev="${BASH_REMATCH[1]}"
  [[ "$route" =~ src\ ([^ ]+) ]] && src="${BASH_REMATCH[1]}"
  if [[ "$route" == local\ * ]]; then
    # MASTER_ADDR is this host's own address: the kernel routes it through lo, but the other nodes reach this host
    # through the interface that holds it.
    local owner=""
    read -r _ owner _ < <(ip -o addr show to "$addr") || true
    dev="${owner:-$dev}" src="$addr"
  fi
  line="network: MASTER_ADDR=$master ($addr) reached through $dev ($src):"
  if [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then line+=" GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME (set by you)"
  else export GLOO_SOCKET_IFNAME="$dev"; line+=" GLOO_SOCKET_IFNAME=$dev (from the route)"; fi
  if [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then line+=" NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME (set by you)"
  else export NCCL_SOCKET_IFNAME="$dev"; line+=" NCCL_SOCKET_IFNAME=$dev (from the route)"; fi
  [ "$dev" = lo ] && line+="; loopback: right only when every node is this host"
  "$log" "$line"
}
