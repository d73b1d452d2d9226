#!/usr/bin/env bash
# One node's part of a zerostage SLURM job: train.sbatch runs it once per node (srun --ntasks-per-node=1).
# It starts the launcher for this node's ranks and relays the stop signal to the ranks alone.
#
#   bash launch/slurm/node.sh train/<stage>.py --deepspeed ds_configs/zeroN.json [stage flags ...]
#
# From the environment (train.sbatch sets all of them): LAUNCHER (deepspeed | torchrun), GPUS_PER_NODE,
# ZS_HOSTS (the allocation's nodes in node-rank order), MASTER_ADDR, MASTER_PORT; SLURM_NODEID, SLURM_JOB_ID.
#
# Network. On more than one node, GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (each one not set by the user) become
# the interface this node reaches MASTER_ADDR through (launch/probe.sh), logged in one line. One node leaves them
# alone: its ranks talk to each other on this host, which works over any local interface, loopback included.
#
# Signals. SLURM delivers a step signal to every process of the step, and neither the deepspeed launcher nor
# torchrun handles SIGUSR1 (its default action kills them), so train.sbatch relays its SIGUSR1 warning to the
# step as SIGURG, whose default action is to ignore it: only this script acts on it, and sends SIGUSR1 to the
# rank processes (the launcher's children: LOCAL_RANK in their environment and not in their parent's). A rank
# that handles SIGUSR1 checkpoints and exits (docs/slurm.md, "Stop, checkpoint, requeue, resume"); one that
# does not dies, and the job resumes from its last periodic checkpoint. SIGTERM (scancel, the time limit) reaches
# every process from SLURM itself; this script only keeps waiting, so the step ends when the launcher does.
set -uo pipefail

node_rank="${SLURM_NODEID:?node.sh runs under srun}"
launcher="${LAUNCHER:-deepspeed}"
read -r -a hosts <<< "${ZS_HOSTS:?}"
nnodes="${#hosts[@]}"
log() { echo "[node $node_rank $(hostname -s) $(date +%T)] $*"; }
source "$(dirname "${BASH_SOURCE[0]}")/../probe.sh"
if [ "$nnodes" -gt 1 ]; then select_network_interface log "$MASTER_ADDR"; fi

# A rank's RANK/LOCAL_RANK come from the launcher; stale values from the submitting shell would only confuse it
# (and the search for rank processes below).
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE

case "$launcher" in
  deepspeed)
    # The deepspeed launcher reads the world from a hostfile; --no_ssh starts only this node's ranks.
    # mktemp: a node-local /tmp may be shared by several slurmd (or clusters) whose job ids collide.
    hostfile=$(mktemp "${TMPDIR:-/tmp}/zerostage-hostfile.${SLURM_JOB_ID}.${node_rank}.XXXXXX") || exit 2
    for host in "${hosts[@]}"; do echo "$host slots=$GPUS_PER_NODE"; done > "$hostfile"
    cmd=(deepspeed --no_ssh --hostfile "$hostfile" --node_rank "$node_rank" --num_nodes "$nnodes"
         --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@")
    ;;
  torchrun)
    hostfile=""
    # c10d rendezvous: torchrun assigns the node ranks itself (--node_rank is only for its static rendezvous).
    cmd=(torchrun --nnodes "$nnodes" --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d
         --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" "$@")
    ;;
  *) log "LAUNCHER=$launcher: use deepspeed or torchrun"; exit 2 ;;
esac

has_local_rank() { grep -qz '^LOCAL_RANK=' "/proc/$1/environ" 2>/dev/null; }

rank_pids() {
  # The processes under $1 that a launcher started as ranks (not their data-loader or compiler children).
  local -A parent=() children=()
  local stat line pid rest
  for stat in /proc/[0-9]*/stat; do
    read -r line < "$stat" 2>/dev/null || continue
    pid="${line%% *}"; rest="${line##*) }"; rest="${rest#* }"; rest="${rest%% *}"
    parent[$pid]="$rest"; children[$rest]+="$pid "
  done
  local queue=("$1") p c
  while ((${#queue[@]})); do
    p="${queue[0]}"; queue=("${queue[@]:1}")
    for c in ${children[$p]:-}; do
      queue+=("$c")
      if has_local_rank "$c" && ! has_local_rank "${parent[$c]}"; then echo "$c"; fi
    done
  done
}

catches_usr1() {
  # SigCgt in /proc/<pid>/status is the mask of the signals a process handles; SIGUSR1 (10) is bit 9.
  local mask
  mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> 9) & 1 ))
}

extension_build_running() {
  # torch builds JIT extensions (DeepSpeed's ops) under a lock file that only the builder removes: a rank killed
  # while holding it leaves every later run on this machine waiting forever.
  local dir="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}"
  compgen -G "$dir/*/lock" > /dev/null || compgen -G "$dir/*/*/lock" > /dev/null
}

pending=0
declare -A signalled=()
relay_stop() {
  # A rank that handles SIGUSR1 gets it at once. One that does not (a trainer without the handler, or one still
  # starting) dies of it, so it gets it only while no JIT extension build is running. Ranks that are not there
  # yet, or must wait, are tried again by the main loop every second.
  local pid ranks=() handled=() unhandled=() waiting=0
  mapfile -t ranks < <(rank_pids "$child")
  for pid in "${ranks[@]}"; do
    [ -n "${signalled[$pid]:-}" ] && continue
    if catches_usr1 "$pid"; then handled+=("$pid")
    elif extension_build_running; then waiting=1
    else unhandled+=("$pid"); fi
  done
  for pid in "${handled[@]}" "${unhandled[@]}"; do signalled[$pid]=1; done
  [ "${#handled[@]}" -gt 0 ] && log "stop requested: SIGUSR1 -> ranks ${handled[*]}"
  [ "${#unhandled[@]}" -gt 0 ] && log "stop requested: SIGUSR1 -> ranks ${unhandled[*]} (no SIGUSR1 handler: they will die; the job resumes from the last checkpoint)"
  [ "$((${#handled[@]} + ${#unhandled[@]}))" -gt 0 ] && kill -USR1 "${handled[@]}" "${unhandled[@]}" 2>/dev/null
  if [ "$waiting" -eq 1 ] || [ "${#signalled[@]}" -eq 0 ]; then
    [ "$pending" -eq 1 ] || log "stop requested: ranks not started yet or a JIT extension build is running; retrying every second"
    pending=1
  else
    pending=0
  fi
}

log "launching: ${cmd[*]}"
"${cmd[@]}" &
child=$!
trap 'relay_stop' URG
trap 'log "SIGTERM: waiting for the launcher to end"' TERM
# `wait` returns early whenever a trapped signal arrives; keep waiting until the launcher itself has ended.
while kill -0 "$child" 2>/dev/null; do
  if [ "$pending" -eq 1 ]; then relay_stop; sleep 1; else wait "$child"; fi
done
wait "$child"; rc=$?
[ -n "$hostfile" ] && rm -f "$hostfile"
log "launcher exited with $rc"
exit "$rc"
