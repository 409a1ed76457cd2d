#!/usr/bin/env bash
# The embedded default under torchrun: PACED-RL on a tiny GPTModel, CPU processes over gloo.
# Knobs: NNODES, NPROC (processes per node), MASTER_ADDR, MASTER_PORT, TP, PP, SAVE; extra
# flags pass through to paced-train (e.g. --train-iters 20 --algo grpo).
set -euo pipefail
NNODES=${NNODES:-1}
NPROC=${NPROC:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}
PP=${PP:-1}
SAVE=${SAVE:-runs/tiny_cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "${NNODES}" --nproc-per-node "${NPROC}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    -m megatron_paced.train --config examples/demo.yaml \
    --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}" \
    --save "${SAVE}" "$@"
