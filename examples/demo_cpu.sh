#!/usr/bin/env bash
# The embedded-default demo under torchrun: a tiny GPTModel learns addition on CPUs (gloo).
# Knobs: NPROC (processes), TP, PP; extra flags pass through, e.g. --train-iters 200.
set -euo pipefail
NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "${NPROC}" -m megatron_paced.demo \
    --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}" "$@"
