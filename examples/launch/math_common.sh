# What the math examples share (sourced by examples/launch/math_torchrun.sh and
# math_slurm.sh): the knobs every launch has, and PACED_ARGS, paced-train's flags with the
# paper's settings (beta 0.05, 8 samples per prompt, lr 1e-6, prompts up to 1024 tokens,
# completions up to 3072, bf16 with selective recomputation). The sourcing script sets TP, PP,
# HF_DIR, MEGATRON_CKPT and RUN_NAME first.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
TASK=${TASK:-gsm8k}                    # gsm8k or math500
SAVE=${SAVE:-runs/${RUN_NAME}_${TASK}}
TRAIN_ITERS=${TRAIN_ITERS:-500}
PROMPTS_PER_STEP=${PROMPTS_PER_STEP:-32}
REPLAY_PER_STEP=${REPLAY_PER_STEP:-32}
MICRO_BATCH=${MICRO_BATCH:-1}  # micro batch 4 does not fit 7B TP2 or 70B TP8xPP4 (docs/planner.md)
PACED_ARGS=(--tokenizer "${HF_DIR}" --load "${MEGATRON_CKPT}" --save "${SAVE}" --save-interval 50
    --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
    --task "${TASK}" --algo paced --beta 0.05 --num-samples-per-prompt 8 --lr 1e-6 --bf16
    --recompute-granularity selective
    --max-prompt-length 1024 --max-new-tokens 3072 --train-iters "${TRAIN_ITERS}"
    --num-prompts-per-step "${PROMPTS_PER_STEP}" --replay-per-step "${REPLAY_PER_STEP}"
    --micro-batch-size "${MICRO_BATCH}" --eval-interval 50)
