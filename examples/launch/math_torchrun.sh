# The shared body of the single-node/torchrun math examples (examples/qwen2.5_*_math.sh):
# PACED-RL for math (GSM8K or MATH-500) with the paper's settings: beta 0.05, 8 samples per
# prompt, lr 1e-6, prompts up to 1024 tokens, completions up to 3072 tokens, bf16 with
# selective recomputation. Sourced by a per-model script that sets TP, HF_DIR, MEGATRON_CKPT,
# RUN_NAME and MODEL_FLAGS (an array); everything else is a knob here.
#
# The policy starts from a Megatron checkpoint converted from the Hugging Face one, with the
# tensor-parallel size it trains with (to resume a run instead, MEGATRON_CKPT=$SAVE):
#   python tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --save "$MEGATRON_CKPT" \
#       --tensor-model-parallel-size "$TP"
#
# Rollouts: ROLLOUT=embedded (default) samples on the trainer's own model; ROLLOUT=sglang
# attaches to running SGLang servers, SGLANG_URL="http://host:30000 ...", started with
#   python -m sglang.launch_server --model-path "$HF_DIR" --host 0.0.0.0 --port 30000 --tp "$TP"
# and updated after every step through WEIGHT_SYNC=disk (files under TMPDIR, which the servers
# must be able to read) or tensor (servers on this node).
#
# Several nodes: run the script on each with NNODES, NODE_RANK and MASTER_ADDR set, or once per
# node with `srun --ntasks-per-node=1` (NNODES, NODE_RANK and MASTER_ADDR then come from Slurm).
# Extra flags pass through to paced-train.
: "${TP:?} ${HF_DIR:?} ${MEGATRON_CKPT:?} ${RUN_NAME:?}"
NNODES=${NNODES:-${SLURM_NTASKS:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_PROCID:-0}}
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)}
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PP=${PP:-1}
# shellcheck source=math_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/math_common.sh"
ROLLOUT=${ROLLOUT:-embedded}           # embedded or sglang
SGLANG_URL=${SGLANG_URL:-}
WEIGHT_SYNC=${WEIGHT_SYNC:-disk}

case "${ROLLOUT}" in
    embedded) ROLLOUT_ARGS=(--rollout-backend embedded) ;;
    sglang)
        read -r -a urls <<<"${SGLANG_URL}"
        if [[ ${#urls[@]} -eq 0 ]]; then
            echo "ROLLOUT=sglang needs SGLANG_URL (URLs of running servers)" >&2; exit 2
        fi
        ROLLOUT_ARGS=(--rollout-backend sglang --sglang-url "${urls[@]}"
                      --weight-sync "${WEIGHT_SYNC}") ;;
    *) echo "ROLLOUT=${ROLLOUT}: choose embedded or sglang" >&2; exit 2 ;;
esac

# shellcheck source=preflight.sh
source "$(dirname "${BASH_SOURCE[0]}")/preflight.sh"
find_launcher
[[ ${NODE_RANK} != 0 ]] || check_master_port "${MASTER_PORT}"
exec "${LAUNCHER}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${GPUS_PER_NODE}" \
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    -m megatron_paced.train "${MODEL_FLAGS[@]}" "${PACED_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "$@"
