"""tools/bench_train_step.py: its FLOP count against the parameter count, and a tiny run on
the CPU that writes every part's figures (the GPU run is in docs/results.md)."""

from __future__ import annotations

import json

import pytest

from megatron_paced.models.config import PRESETS
from megatron_paced.models.counting import count_parameters
from tests.conftest import run_python
from tools.bench_train_step import forward_flops, matmul_params


@pytest.mark.parametrize("name", ["qwen2.5-1.5b", "qwen2.5-7b", "smollm2-135m"])
def test_flops_count_every_weight_that_multiplies_a_token(name):
    cfg = PRESETS[name]
    h, layers = cfg.hidden_size, cfg.num_layers
    biases = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim \
        if cfg.spec.add_qkv_bias else 0
    # Parameters that multiply no token: the input embedding (a lookup), norms, biases.
    not_matmul = h * cfg.vocab_size + layers * (2 * h + biases) + h
    if not cfg.untie_embeddings_and_output_weights:
        not_matmul -= h * cfg.vocab_size  # tied: the one matrix is the output layer's too
    assert matmul_params(cfg) == count_parameters(cfg) - not_matmul
    q = cfg.num_attention_heads * cfg.head_dim
    assert forward_flops(cfg, 10, 0) == 10 * 2 * matmul_params(cfg)
    assert forward_flops(cfg, 1, 100) - forward_flops(cfg, 1, 0) == layers * 4 * q * 100


@pytest.mark.distributed
def test_tiny_run_on_cpu_reports_every_part(tmp_path):
    out = tmp_path / "bench.json"
    result = run_python("-m tools.bench_train_step", "--repeats", "1", "--peak-tflops", "0.5",
                        "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert set(parts) == {"tb step (PACED)", "grpo step", "logprob recompute", "generation",
                          "paced bookkeeping"}
    # Timings are the benchmark's output, not something a test can assert on: each part
    # reports one, the PACED share is reported, and their values are not checked.
    assert all(isinstance(p["seconds"], float) for p in parts.values())
    assert parts["generation"]["tokens"] == 2 * 8 * 16
    assert parts["tb step (PACED)"]["flops"] == 3 * parts["logprob recompute"]["flops"]
    assert isinstance(report["paced_share"], float)
    assert isinstance(report["paced_share_of_train_step"], float)
    assert "MFU" in result.stdout and "PACED parts:" in result.stdout
    assert "%" in result.stdout.split("tb step (PACED)")[1].split("\n")[0]  # MFU with a peak
