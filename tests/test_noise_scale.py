"""The gradient noise scale's estimator (megatron_paced.rl.noise_scale) on synthetic
gradients with a known mean and covariance: the two-batch-size estimates of |G|^2 and
tr(Sigma) are unbiased, and their ratio over many steps is B_simple within its standard
error."""

from __future__ import annotations

import pytest
import torch

from megatron_paced.rl.noise_scale import NoiseScale, noise_scale_terms, run_noise_scale


def test_two_batch_sizes_recover_the_noise_scale():
    gen = torch.Generator().manual_seed(0)
    dim, ranks, per_rank = 50, 4, 8
    mean = torch.full((dim,), 0.1, dtype=torch.float64)
    scales = torch.linspace(0.2, 1.0, dim, dtype=torch.float64)  # per-item gradient noise
    b_simple = float((scales ** 2).sum() / (mean ** 2).sum())  # tr(Sigma) / |G|^2 = 11.6
    noise = NoiseScale()
    for _ in range(3000):
        items = mean + scales * torch.randn(ranks, per_rank, dim, generator=gen,
                                            dtype=torch.float64)
        local = items.mean(1)  # each rank's mean gradient over its 8 items
        g2, trace = noise_scale_terms(local.pow(2).sum(1), torch.full((ranks,), per_rank),
                                      float(items.mean((0, 1)).pow(2).sum()), ranks * per_rank)
        noise.add(g2, trace, ranks * per_rank)
    out = noise.summary()
    assert out["grad_noise_steps"] == 3000 and out["grad_batch_items"] == 32
    assert abs(out["grad_noise_trace"] - float((scales ** 2).sum())) < 0.05 * (scales ** 2).sum()
    assert abs(out["grad_noise_scale"] - b_simple) < 4 * out["grad_noise_scale_se"], out
    assert out["grad_noise_scale_se"] < 0.1 * b_simple
    assert noise.summary() == {}  # started afresh
    noise.add(1.0, 2.0, 32)
    restored = NoiseScale()
    restored.load_state_dict(noise.state_dict())
    assert restored.summary()["grad_noise_scale"] == 2.0


def test_a_runs_noise_scale_pools_its_logs_as_one_interval_would():
    """run_noise_scale over logs of unequal intervals (the last one short, as at a run's end)
    equals one summary over all the steps: S and G^2 weighted by each log's steps."""
    gen = torch.Generator().manual_seed(1)
    terms = torch.rand(17, 3, generator=gen, dtype=torch.float64) + 0.5
    whole, rows = NoiseScale(), []
    for start, stop in ((0, 10), (10, 15), (15, 17)):
        part = NoiseScale()
        for g2, trace, items in terms[start:stop].tolist():
            part.add(g2, trace, 100 * items)
            whole.add(g2, trace, 100 * items)
        rows += [{"step": stop}, part.summary()]
    scale, batch = run_noise_scale(rows)
    expected = whole.summary()
    assert scale == pytest.approx(expected["grad_noise_scale"], rel=1e-12)
    assert batch == pytest.approx(expected["grad_batch_items"], rel=1e-12)
    assert run_noise_scale([{"step": 1}]) is None
