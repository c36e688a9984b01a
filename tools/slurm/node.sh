#!/bin/bash
# The per-node part of tools/slurm/train.sbatch: torchrun for this node, with the rendezvous from SLURM's
# variables, then the given script and its arguments (run from the checkout's root):
#   SLURM_NNODES   nodes in the job               -> --nnodes
#   SLURM_NODEID   this node's index, 0..N-1      -> --node_rank (one task per node)
#   SLURM_JOB_NODELIST, first host (scontrol show hostnames) -> --master_addr; MASTER_ADDR, when set, instead
#   MASTER_PORT    default 20000 + SLURM_JOB_ID % 20000 (jobs sharing a node do not collide)
#   NPROC_PER_NODE default SLURM_GPUS_ON_NODE, else 8; PYTHON default python
# Its CPU form, tested over loopback (tests/test_training.py::test_the_slurm_node_script_over_loopback):
#   ACCELERATE_USE_CPU=1 NPROC_PER_NODE=1 SLURM_NNODES=2 SLURM_NODEID=<0|1> MASTER_ADDR=127.0.0.1 \
#   MASTER_PORT=... bash tools/slurm/node.sh train_global_model.py --config configs/tiny/...
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
integer() {  # integer NAME VALUE MIN [MAX]: one line unless MIN <= VALUE (<= MAX)
    [[ "$2" =~ ^[0-9]+$ ]] && (( 10#$2 >= $3 )) && { [ -z "${4:-}" ] || (( 10#$2 <= $4 )); } \
        || fail "$1=$2: must be an integer >= $3${4:+ and <= $4}"
}
for name in SLURM_NNODES SLURM_NODEID; do
    [ -n "${!name:-}" ] || fail "$name is not set: run tools/slurm/node.sh through srun (tools/slurm/train.sbatch)"
done
integer SLURM_NNODES "$SLURM_NNODES" 1
integer SLURM_NODEID "$SLURM_NODEID" 0 $((10#$SLURM_NNODES - 1))
if [ -z "${MASTER_ADDR:-}" ]; then
    [ -n "${SLURM_JOB_NODELIST:-}" ] || fail "SLURM_JOB_NODELIST is not set (and no MASTER_ADDR): run through srun"
    command -v scontrol > /dev/null || fail "scontrol is not on PATH to expand SLURM_JOB_NODELIST; set MASTER_ADDR"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [ -n "$MASTER_ADDR" ] || fail "scontrol show hostnames $SLURM_JOB_NODELIST named no host; set MASTER_ADDR"
fi
if [ -z "${MASTER_PORT:-}" ]; then
    integer SLURM_JOB_ID "${SLURM_JOB_ID:-0}" 0
    MASTER_PORT=$((20000 + 10#${SLURM_JOB_ID:-0} % 20000))
fi
integer MASTER_PORT "$MASTER_PORT" 1 65535
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
integer NPROC_PER_NODE "$NPROC_PER_NODE" 1
echo "node $SLURM_NODEID of $SLURM_NNODES: $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT" \
     "(waits there until all $SLURM_NNODES node(s) have joined)" >&2
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
