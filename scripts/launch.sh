# shellcheck shell=bash
# Sourced by the pretrain.sh scripts: `launch ENTRY_SCRIPT FLAGS...` runs torchrun with the
# cluster layout taken from the environment:
#   NUM_NODES (1); MASTER_ADDR (127.0.0.1) and MASTER_PORT (a free port on one node, else 29500): the
#     rendezvous endpoint, on one of the nodes, the same on every node (NODE_RANK is not needed: nodes
#     are ranked as they join),
#   NPROC_PER_NODE (GPUs on this node, or 1 without GPUs), SEP_SIZE (1: no sequence/expert parallelism),
#   MAX_RESTARTS (3): when a worker dies, torchrun stops the others and restarts them all, up to
#     this many times; each restart resumes from the run's newest complete checkpoint,
#   RUN_ID (tinytron): the rendezvous id, the same on every node of a job.
# Extra flags given to pretrain.sh are appended, so they override the script's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The Python that runs torchrun (as `python -m tinytron.commands.torchrun`: torchrun, with bad
# input found by the workers ending in their one line, exit 2) and the workers, so that no
# venv needs activating: $TINYTRON_PYTHON, else the active venv's ($VIRTUAL_ENV), else the venv at
# the repository's root (.venv, README's setup), else python3 on PATH.
if [ -n "${TINYTRON_PYTHON:-}" ]; then
  PYTHON=$TINYTRON_PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PYTHON=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then
  PYTHON=$PWD/.venv/bin/python
else
  PYTHON=$(command -v python3 || true)
fi
# find_spec, not `import torch`: whether torch is there, without the ~1.5 s of importing it.
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("torch"))' 2>/dev/null; then
  echo "[tinytron] error: no Python with torch found (tried \$TINYTRON_PYTHON, \$VIRTUAL_ENV, .venv/bin/python, python3" \
    "on PATH${PYTHON:+: $PYTHON has no torch}); install as README.md says or set TINYTRON_PYTHON" >&2
  exit 2
fi
echo "[tinytron] python: $PYTHON" >&2

NUM_NODES=${NUM_NODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [ -z "${MASTER_PORT:-}" ]; then
  if [ "$NUM_NODES" = 1 ]; then  # a free port: two jobs on one machine never share a rendezvous
    MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  else
    MASTER_PORT=29500
  fi
fi
if [ -z "${NPROC_PER_NODE:-}${PET_NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
SEP_SIZE=${SEP_SIZE:-1}
# The workers of a restart must not share the agent's TCPStore: it still holds the previous
# attempt's gloo/NCCL addresses, and the new process group connects to those and fails or hangs
# (pytorch#135712). Unshared, each attempt bootstraps from a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Append `FLAG VALUE` to torchrun's arguments unless the platform already set torchrun's own
# variable for it (PET_NNODES for --nnodes, ...; Kubeflow's PyTorchJob does): torchrun reads
# those itself, and a flag on the command line would override them.
torchrun_args=()
opt() {
  local var
  var="PET_$(tr 'a-z-' 'A-Z_' <<< "${1#--}")"
  [ -n "${!var:-}" ] || torchrun_args+=("$1" "$2")
}
opt --nnodes "$NUM_NODES"
opt --nproc-per-node "${NPROC_PER_NODE:-}"
opt --max-restarts "${MAX_RESTARTS:-3}"
# The c10d rendezvous, also on one node: torchrun's static one cannot restart workers (it keeps
# one store for all attempts); with c10d a restarted node rejoins the job. Skipped when the
# platform runs the rendezvous.
if [ -z "${PET_RDZV_ENDPOINT:-}${PET_MASTER_ADDR:-}" ]; then
  opt --rdzv-backend c10d
  opt --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
  opt --rdzv-id "${RUN_ID:-tinytron}"
fi

# Stopping (docs/checkpoints.md, "Preemption"): SIGTERM or SIGUSR1 to this script is passed on
# to the workers (torchrun's children), which save a checkpoint and exit 0; SIGUSR1 reaching
# torchrun itself is ignored (its default action would kill it), SIGTERM makes it pass SIGTERM on
# and exit 1. The workers confirm a stop after a complete save in $TINYTRON_STOP_FILE
# ("<signal> <step>"); then this launcher exits 0 whatever torchrun's exit status, and under
# SLURM (SLURM_JOB_ID set) a stop on SIGUSR1, the early warning before the time limit, requeues
# the job (task 0 runs `scontrol requeue`), which resumes from that checkpoint.
launch() {
  local entry=$1; shift
  TINYTRON_STOP_FILE=$(mktemp "${TMPDIR:-/tmp}/tinytron-stop.XXXXXX")
  export TINYTRON_STOP_FILE
  # Bad flags (and a finished run found again) fail here, in one process and one line, exit 2,
  # before torchrun starts any worker (or restarts them for nothing); what only the workers can
  # find (no GPU, the data) ends the same way through tinytron.commands.torchrun. Skipped
  # when the platform sets torchrun's layout (the world size is then torchrun's to know). The entry
  # script must hand its flags to tinytron.training.run (pretrain_*.py and docs/extending.md do),
  # which checks them and returns when TINYTRON_PREFLIGHT is set; TINYTRON_PREFLIGHT=0 skips this.
  if [ "${TINYTRON_PREFLIGHT:-}" != 0 ] && [ -z "${PET_NNODES:-}${PET_NPROC_PER_NODE:-}" ] \
      && [[ "$NUM_NODES" =~ ^[0-9]+$ ]]; then
    TINYTRON_PREFLIGHT=$((NUM_NODES * NPROC_PER_NODE)) "$PYTHON" "$entry" --sep_size "$SEP_SIZE" "$@" || exit
  fi
  (trap '' USR1; exec "$PYTHON" -m tinytron.commands.torchrun "${torchrun_args[@]}" "$entry" --sep_size "$SEP_SIZE" "$@") &
  torchrun_pid=$!
  trap 'forward_signal TERM' TERM
  trap 'forward_signal USR1' USR1
  trap : INT  # Ctrl-C reaches torchrun too, which stops the workers: keep waiting for it
  local rc=0
  wait "$torchrun_pid" || rc=$?
  while kill -0 "$torchrun_pid" 2>/dev/null; do  # `wait` was interrupted by a trapped signal
    rc=0
    wait "$torchrun_pid" || rc=$?
  done
  local stop
  stop=$(cat "$TINYTRON_STOP_FILE")
  rm -f "$TINYTRON_STOP_FILE"
  if [ -n "$stop" ]; then
    echo "[tinytron] the workers stopped on ${stop% *} after saving step ${stop#* } (torchrun exit $rc): exit 0" >&2
    rc=0
    if [ "${stop% *}" = SIGUSR1 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_PROCID:-0}" = 0 ]; then
      echo "[tinytron] requeueing SLURM job $SLURM_JOB_ID" >&2
      scontrol requeue "$SLURM_JOB_ID" || echo "[tinytron] scontrol requeue $SLURM_JOB_ID failed" >&2
    fi
  fi
  exit "$rc"
}

# The workers (torchrun's children) act on the signal; before they exist, torchrun gets SIGTERM.
forward_signal() {
  pkill "-$1" -P "$torchrun_pid" || kill -TERM "$torchrun_pid" 2>/dev/null || true
}
