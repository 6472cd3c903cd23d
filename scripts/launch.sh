# Sourced by the pretrain.sh scripts: `launch ENTRY_SCRIPT FLAGS...` runs torchrun with the
# cluster layout taken from the environment:
#   NUM_NODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
#   NPROC_PER_NODE (GPUs on this node, or 1 without GPUs), SEP_SIZE (1: no sequence/expert parallelism)
# Extra flags given to pretrain.sh are appended, so they override the script's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
SEP_SIZE=${SEP_SIZE:-1}

launch() {
  local entry=$1; shift
  exec torchrun --nnodes "$NUM_NODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" \
    "$entry" --sep_size "$SEP_SIZE" "$@"
}
