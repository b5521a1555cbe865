#!/bin/bash
# Lamina on a Slurm cluster: one heterogeneous job, one component per kind of machine.
#
#   component 0: the model node (deployment.nodes[0]: the tensor-parallel model workers,
#                the engine and the HTTP server), on compute-optimized GPUs (H100);
#   component 1: the attention nodes (deployment.nodes[1:]), on memory-rich GPUs (H20, H200).
#
# Submit from the repository root (or wherever the config path below resolves):
#
#   sbatch deploy/slurm-hetjob.sh
#
# Every machine runs the command `lamina serve --config deploy/lamina-3node.yaml --print-launch`
# prints, with its node rank: the model node is rank 0, the attention nodes 1, 2, ... in the
# order of their component. torch elastic's c10d rendezvous runs on the model node (the first
# host of component 0), port 29500. A different config needs its own --nodes, --gpus-per-node
# and --nnodes here (tests/test_deploy_recipes.py checks this file against the config).
# Add your cluster's --partition / --account / --constraint to each component.
#
#SBATCH --job-name=lamina
#SBATCH --time=24:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=2
#SBATCH --exclusive
#SBATCH hetjob
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --exclusive

set -uo pipefail

# Node 0's address, which every machine reaches: the first host of the model component.
RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n1):29500"
export RDZV_ENDPOINT
echo "lamina: rendezvous at $RDZV_ENDPOINT" >&2

# One step per kind of node, one task per node; the node rank is computed on each node from
# its index in its component (SLURM_NODEID), after the nodes of the components before it.
srun --het-group=0 --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec lamina serve --config deploy/lamina-3node.yaml --nnodes 3 --node-rank $SLURM_NODEID --rdzv-endpoint $RDZV_ENDPOINT' &
srun --het-group=1 --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec lamina serve --config deploy/lamina-3node.yaml --nnodes 3 --node-rank $((1+SLURM_NODEID)) --rdzv-endpoint $RDZV_ENDPOINT' &

# A lost machine ends lamina on every machine (its last line names the node); the first step
# to end ends the job, so a step that never started does not leave the other waiting.
wait -n
status=$?
kill $(jobs -p) 2>/dev/null
wait
exit "$status"
