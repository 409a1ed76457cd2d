"""The calibration probe's arithmetic (megatron_paced.rl.calibration) on one process: the
probe's own noise is removed, so a perfect estimator scores about 0 and a biased one its bias."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_paced.paced.log_z import ShardedLogZ
from megatron_paced.rl.calibration import calibration_probe, calibration_stats, probe_rows


def _probe_accuracy(p_true: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand(len(p_true), num_samples, generator=gen, dtype=torch.float64)
    return (draws < p_true[:, None]).double().mean(dim=1)


def test_noise_correction_scores_a_perfect_estimator_near_zero_and_a_biased_one_its_bias():
    gen = torch.Generator().manual_seed(0)
    p_true = torch.rand(4000, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    p_hat = _probe_accuracy(p_true, 32, seed=1)
    perfect = calibration_stats(p_true, p_hat, 32, "visited")
    assert 0.05 < perfect["calib_visited_mae"] < 0.08  # the probe's noise, not the estimate
    assert perfect["calib_visited_rmse_corrected"] < 0.02
    assert abs(perfect["calib_visited_noise_var"] - float(
        (p_true * (1 - p_true)).mean() / 32)) < 2e-4  # unbiased for Var(p_hat)
    biased = calibration_stats((p_true + 0.1).clamp(0, 1), p_hat, 32, "visited")
    assert abs(biased["calib_visited_rmse_corrected"] - 0.1) < 0.015
    assert calibration_stats(p_true[:0], p_hat[:0], 32, "unvisited") == {"calib_unvisited_num": 0}
    # Exactly unbiased: over a binomial's outcomes (M = 4 samples at p = 1/2, weights
    # 1, 4, 6, 4, 1), the mean of p_hat (1 - p_hat) / (M - 1) is Var(p_hat) = p (1 - p) / M.
    outcomes = torch.tensor([0.0] + [0.25] * 4 + [0.5] * 6 + [0.75] * 4 + [1.0],
                            dtype=torch.float64)
    exact = calibration_stats(outcomes, outcomes, 4, "visited")["calib_visited_noise_var"]
    assert exact == pytest.approx(0.25 / 4, rel=1e-12)


def test_probe_draws_visited_and_unvisited_rows_and_never_trains():
    visits = torch.tensor([0, 3, 0, 1, 0, 0, 2, 0])
    groups = probe_rows(visits, 3, seed=5, step=10)
    assert set(groups["visited"].tolist()) == {1, 3, 6}
    assert len(groups["unvisited"]) == 3 and all(visits[groups["unvisited"]] == 0)
    assert torch.equal(probe_rows(visits, 3, seed=5, step=10)["unvisited"], groups["unvisited"])

    beta, p_true = 0.05, torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    table = ShardedLogZ(8, beta=beta, init_acc=0.5, lr=0.5)
    table.apply_gradients(torch.tensor([1, 3, 6]), 2 * (10.0 - p_true[[1, 3, 6]] / beta))
    before = (table.values.clone(), table.visits.clone())
    asked = []

    def sample_rewards(problems, n, seed):
        asked.append((list(problems), n))
        gen = torch.Generator().manual_seed(seed)
        rows = torch.tensor(problems)
        return (torch.rand(len(rows), n, generator=gen, dtype=torch.float64)
                < p_true[rows, None]).double()

    ctx = SimpleNamespace(dp_rank=0, dp_size=1, dp_group=None)
    out = calibration_probe(table, sample_rewards, list(range(8)), num_prompts=8,
                            num_samples=400, seed=5, step=10, ctx=ctx, per_prompt=True)
    assert sorted(row for row, _, _, _ in out["calib_visited_prompts"]) == [1, 3, 6]
    for row, visits, estimate, p_hat in out["calib_visited_prompts"]:
        assert visits == 1 and estimate == pytest.approx(float(p_true[row]), abs=1e-4)
        assert abs(p_hat - float(p_true[row])) < 0.1
    assert out["calib_visited_num"] == 3 and out["calib_unvisited_num"] == 5
    assert out["calib_visited_rmse_corrected"] < 0.03  # the table holds the true accuracy
    assert out["calib_unvisited_rmse_corrected"] > 0.2  # unvisited rows sit at tau
    assert [n for _, n in asked] == [400, 400]
    assert torch.equal(table.values, before[0]) and torch.equal(table.visits, before[1])


def test_a_rank_with_no_probe_prompt_takes_part_and_asks_for_nothing(monkeypatch):
    """DP2, rank 1: one visited row (rank 0 samples it) and no unvisited row at all."""
    import torch.distributed as dist

    table = ShardedLogZ(4, beta=0.05, init_acc=0.5, lr=0.5)
    table.apply_gradients(torch.arange(4), torch.zeros(4))  # every row visited
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: reduced.append(t.clone()))
    asked = []
    ctx = SimpleNamespace(dp_rank=1, dp_size=2, dp_group=None)
    out = calibration_probe(table, lambda *a: asked.append(a), list(range(4)), num_prompts=1,
                            num_samples=8, seed=0, step=3, ctx=ctx)
    assert asked == [] and len(reduced) == 2  # one all-reduce per group, as every rank does
    assert out["calib_visited_num"] == 1 and out["calib_unvisited_num"] == 0


@pytest.mark.distributed
def test_proposition_4_1_holds_inside_the_trainer(tmp_path):
    """paced-train on DP2 (1-digit sums, a short warm start, PACED-RL defaults): after 24
    steps (about 12 visits per prompt) the probe puts beta * log_z of the visited prompts
    within 0.12 RMS of their 32-sample accuracy (the probe's own noise removed) and within
    0.65 of those accuracies' spread, so no constant estimate would pass; and
    beta * KL(pi_old || pi_theta) stays below the paper's 4e-3 on average."""
    from megatron_paced.testing.distributed import launch_workers

    save = tmp_path / "run"
    # 8 held-out prompts: the SFT warm start never sees them, so with more of the 100
    # one-digit sums held out it would see little else than the 16 training ones and learn
    # them all (no spread of accuracy left to estimate).
    flags = ["--task-max-digits", "1", "--task-num-prompts", "16", "--sft-warmup-iters", "150",
             "--eval-num-prompts", "8",
             "--num-prompts-per-step", "8", "--num-samples-per-prompt", "8", "--lr", "1e-5",
             "--prompt-selection", "uniform", "--log-prompt-accuracy",
             "--micro-batch-size", "16", "--train-iters", "24", "--replay-per-step", "0",
             "--max-new-tokens", "4", "--calibration-interval", "24",
             "--calibration-prompts", "16", "--calibration-samples", "32", "--kl-interval", "4",
             "--save", str(save)]
    result = launch_workers("megatron_paced.train", nprocs=2, args=flags, timeout_s=600)
    assert result.returncode == 0, result.output[-5000:]
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    final = rows[-1]
    print({k: v for k, v in final.items() if k.startswith("calib_")})
    assert final["step"] == 24 and final["calib_visited_num"] == 16
    # The run's trajectory depends on the machine's float rounding (the warm start ends
    # elsewhere): RMSE 0.082 against a spread of 0.275 where this test was written, 0.105
    # against 0.171 on the 2026-12-07 CI machine. What holds on both: a real spread of
    # difficulty, and an estimate well inside it (a constant's RMSE is at least the spread).
    assert final["calib_visited_acc_std"] >= 0.15, final
    assert final["calib_visited_rmse_corrected"] <= 0.12, final
    assert final["calib_visited_rmse_corrected"] <= 0.65 * final["calib_visited_acc_std"], final
    kls = [r["beta_kl_old_new"] for r in rows if "beta_kl_old_new" in r]
    assert len(kls) == 6 and abs(sum(kls) / len(kls)) < 4e-3, kls  # held out: either sign
