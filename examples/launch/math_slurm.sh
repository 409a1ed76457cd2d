# The shared body of the Slurm math examples (examples/*.sbatch): PACED-RL for math with the
# paper's settings (beta 0.05, 8 samples per prompt, lr 1e-6, 1024 prompt + 3072 new tokens,
# bf16, selective recomputation) on the job's first nodes, plus SGLANG_NODES nodes of SGLang
# rollout servers. Sourced by a per-model batch script that sets TP, PP, HF_DIR,
# MEGATRON_CKPT and RUN_NAME (and its #SBATCH lines); everything else is a knob here.
#
# SGLANG_NODES>0: the last SGLANG_NODES nodes of the job each run one SGLang server
# (--tp SGLANG_TP) and the trainer attaches to them; new weights reach them through files under
# WEIGHT_STAGING_DIR, which must be on a file system every node shares. SGLANG_NODES=0: rollouts
# on the trainer's own model (embedded), which needs PP=1. Submit from the repository root
# (on the shared file system); the job's nodes then run from it too.
: "${TP:?} ${PP:?} ${HF_DIR:?} ${MEGATRON_CKPT:?} ${RUN_NAME:?}"
# shellcheck source=math_common.sh
source "${SLURM_SUBMIT_DIR:-.}/examples/launch/math_common.sh"
SGLANG_NODES=${SGLANG_NODES:-1}
SGLANG_TP=${SGLANG_TP:-8}
SGLANG_PORT=${SGLANG_PORT:-30000}
SGLANG_STARTUP_S=${SGLANG_STARTUP_S:-1800}
WEIGHT_STAGING_DIR=${WEIGHT_STAGING_DIR:-${SAVE}/weight-staging}

mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
NUM_TRAIN_NODES=$(( ${#NODES[@]} - SGLANG_NODES ))
if (( NUM_TRAIN_NODES < 1 || NUM_TRAIN_NODES * GPUS_PER_NODE % (TP * PP) != 0 )); then
    echo "${#NODES[@]} nodes - SGLANG_NODES ${SGLANG_NODES} = ${NUM_TRAIN_NODES} training nodes" \
        "of ${GPUS_PER_NODE} GPUs: need a multiple of TP ${TP} x PP ${PP} GPUs" >&2; exit 2
fi
if (( SGLANG_NODES == 0 && PP > 1 )); then
    echo "SGLANG_NODES=0 (embedded rollouts) needs PP=1, not ${PP}" >&2; exit 2
fi
TRAIN_NODES=$(IFS=,; echo "${NODES[*]:0:NUM_TRAIN_NODES}")
MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
mkdir -p "${SAVE}"

ROLLOUT_ARGS=(--rollout-backend embedded)
if (( SGLANG_NODES > 0 )); then
    SGLANG_HOSTS=("${NODES[@]:NUM_TRAIN_NODES}")
    # The servers listen on the cluster network: a key per job (or MEGATRON_PACED_API_KEY)
    # guards /generate and the weight-update endpoints (SGLang takes it from argv only).
    MEGATRON_PACED_API_KEY=${MEGATRON_PACED_API_KEY:-$(python -c 'import secrets; print(secrets.token_urlsafe(32))')}
    export MEGATRON_PACED_API_KEY
    # SGLANG_RETURN_ORIGINAL_LOGPROB=1: log-probs of the temperature-1 policy (pi_old), not
    # of the temperature-scaled logits SGLang returns by default.
    srun --nodes="${SGLANG_NODES}" --ntasks-per-node=1 \
        --overlap --export=ALL,SGLANG_RETURN_ORIGINAL_LOGPROB=1 \
        --nodelist="$(IFS=,; echo "${SGLANG_HOSTS[*]}")" --output="${SAVE}/sglang-%N.log" \
        python -m sglang.launch_server --model-path "${HF_DIR}" --tp "${SGLANG_TP}" \
        --host 0.0.0.0 --port "${SGLANG_PORT}" --api-key "${MEGATRON_PACED_API_KEY}" &
    SGLANG_PID=$!
    trap 'kill "${SGLANG_PID}" 2>/dev/null || true' EXIT
    URLS=()
    for host in "${SGLANG_HOSTS[@]}"; do
        URLS+=("http://${host}:${SGLANG_PORT}")
        deadline=$(( SECONDS + SGLANG_STARTUP_S ))
        until curl -sf -o /dev/null "http://${host}:${SGLANG_PORT}/health"; do
            if ! kill -0 "${SGLANG_PID}" 2>/dev/null || (( SECONDS > deadline )); then
                echo "SGLang server on ${host} did not come up; see ${SAVE}/sglang-${host}.log" >&2
                exit 1
            fi
            sleep 10
        done
    done
    # The pushed weights are staged on a file system the SGLang nodes share.
    mkdir -p "${WEIGHT_STAGING_DIR}"
    ROLLOUT_ARGS=(--rollout-backend sglang --sglang-url "${URLS[@]}" --weight-sync disk
                  --weight-sync-dir "${WEIGHT_STAGING_DIR}")
fi

# One launcher (paced-run: torchrun with one-line failures) per training node; its node rank is
# its task rank in this step.
# shellcheck source=preflight.sh
source "${SLURM_SUBMIT_DIR:-.}/examples/launch/preflight.sh"
find_launcher
# shellcheck disable=SC2016  # $SLURM_PROCID expands in each task, not here
srun --nodes="${NUM_TRAIN_NODES}" --ntasks-per-node=1 --nodelist="${TRAIN_NODES}" \
    --kill-on-bad-exit=1 bash -c 'exec "$0" --node-rank "${SLURM_PROCID}" "$@"' "${LAUNCHER}" \
    --nnodes "${NUM_TRAIN_NODES}" --nproc-per-node "${GPUS_PER_NODE}" \
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    -m megatron_paced.train --hf-config "${HF_DIR}/config.json" "${PACED_ARGS[@]}" \
    "${ROLLOUT_ARGS[@]}" "$@"
