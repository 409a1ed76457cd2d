#!/usr/bin/env bash
# PACED-RL on Qwen2.5-7B for math (GSM8K or MATH-500) with the paper's settings: beta 0.05,
# 8 samples per prompt, lr 1e-6, prompts up to 1024 tokens, completions up to 3072 tokens.
# Layout: TP2 PP1 on one node of 8 GPUs (DP4). Run from the repository root; the
# knobs (TASK, ROLLOUT, SGLANG_URL, NNODES, ...) and the conversion step are in
# examples/launch/math_torchrun.sh.
#
#   HF_DIR=ckpt/Qwen2.5-7B MEGATRON_CKPT=ckpt/qwen2.5-7b-tp2 \
#       examples/qwen2.5_7b_math.sh --train-iters 200
set -euo pipefail
TP=${TP:-2}
HF_DIR=${HF_DIR:-ckpt/Qwen2.5-7B}
MEGATRON_CKPT=${MEGATRON_CKPT:-ckpt/qwen2.5-7b-tp${TP}}
RUN_NAME=qwen2.5_7b
MODEL_FLAGS=(--model qwen2.5-7b)
# shellcheck source=launch/math_torchrun.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch/math_torchrun.sh"
