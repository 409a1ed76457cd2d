#!/usr/bin/env bash
# The embedded default under torchrun: PACED-RL on a tiny GPTModel, CPU processes over gloo.
# Run from the repository root; extra flags pass through to paced-train
# (e.g. --train-iters 20 --algo grpo).
#
#   examples/tiny_cpu.sh                                   # one machine, 2 processes (DP2)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 examples/tiny_cpu.sh     # on host0, and on host1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 examples/tiny_cpu.sh     # with NODE_RANK=1
#   sbatch --nodes=2 --ntasks-per-node=1 examples/tiny_cpu.sh       # under Slurm
#
# Under Slurm every task is one torchrun agent (a "node" to torchrun): NNODES defaults to
# SLURM_NTASKS and NODE_RANK to SLURM_PROCID (with one task per node these equal SLURM_NNODES
# and SLURM_NODEID), MASTER_ADDR to the job's first node. Submitted with more than one task,
# the batch script starts itself once per task with srun.
#
# Knobs: NNODES, NODE_RANK, NPROC (processes per node), MASTER_ADDR, MASTER_PORT, TP, PP, SAVE,
# LAUNCHER (default paced-run, torchrun with one-line failures, from the active environment or
# the repository's .venv: no need to activate it).
#SBATCH --job-name=paced-tiny-cpu
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
set -euo pipefail
NNODES=${NNODES:-${SLURM_NTASKS:-1}}
NPROC=${NPROC:-2}
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)}
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}
PP=${PP:-1}
SAVE=${SAVE:-runs/tiny_cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The batch script of a multi-task job (no job step yet): one copy of this script per task.
if [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_STEP_ID:-} && ${NNODES} -gt 1 ]]; then
    export MASTER_ADDR MASTER_PORT
    exec srun --ntasks="${NNODES}" --kill-on-bad-exit=1 examples/tiny_cpu.sh "$@"
fi
NODE_RANK=${NODE_RANK:-${SLURM_PROCID:-0}}
# shellcheck source=launch/preflight.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch/preflight.sh"
find_launcher
[[ ${NODE_RANK} != 0 ]] || check_master_port "${MASTER_PORT}"

exec "${LAUNCHER}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC}" \
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    -m megatron_paced.train --config examples/demo.yaml \
    --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}" \
    --save "${SAVE}" "$@"
