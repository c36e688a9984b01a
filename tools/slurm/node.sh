#!/bin/bash
# The per-node part of tools/slurm/train.sbatch: torchrun for this node, with the rendezvous from SLURM's
# variables, then the given script and its arguments (run from the checkout's root):
#   SLURM_NNODES   nodes in the job               -> --nnodes
#   SLURM_NODEID   this node's index, 0..N-1      -> --node_rank (one task per node)
#   SLURM_JOB_NODELIST, first host (scontrol show hostnames) -> --master_addr; MASTER_ADDR, when set, instead
#   MASTER_PORT    default 20000 + SLURM_JOB_ID % 20000 (jobs sharing a node do not collide)
#   NPROC_PER_NODE default SLURM_GPUS_ON_NODE, else 8; PYTHON default python
# Its CPU form, tested over loopback (tests/test_training.py::test_the_slurm_node_script_over_loopback):
#   ACCELERATE_USE_CPU=1 NPROC_PER_NODE=1 SLURM_NNODES=2 SLURM_NODEID=<0|1> SLURM_JOB_NODELIST=... \
#   MASTER_PORT=... bash tools/slurm/node.sh train_global_model.py --config configs/tiny/...
set -euo pipefail
for name in SLURM_NNODES SLURM_NODEID; do
    if [ -z "${!name:-}" ]; then
        echo "error: $name is not set: run tools/slurm/node.sh through srun (tools/slurm/train.sbatch)" >&2
        exit 2
    fi
done
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}" | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
echo "node $SLURM_NODEID of $SLURM_NNODES: $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
