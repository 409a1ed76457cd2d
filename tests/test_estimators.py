"""The accuracy estimators selection can read besides beta * log_z (paced/estimators.py): the
Beta posterior (MoPPS) against hand computations, and the oracle inside the trainer against
the groups it then observes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_paced.paced.estimators import BetaPosteriorTable
from megatron_paced.testing.distributed import launch_workers


def test_beta_posterior_counts_successes_discounts_and_round_trips():
    table = BetaPosteriorTable(10, prior=1.0, decay=1.0)
    assert torch.equal(table.gather_acc_est(), torch.full((10,), 0.5, dtype=torch.float64))
    # Prompt 3 in two groups of this step, prompt 7 in one (4 samples each).
    rows = torch.tensor([3, 7, 3])
    rewards = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    table.observe(rows, rewards)
    # Beta(1 + 3, 1 + 5) and Beta(1 + 4, 1 + 0)
    torch.testing.assert_close(table.acc_est(torch.tensor([3, 7, 0])),
                               torch.tensor([4 / 10, 5 / 6, 0.5], dtype=torch.float64),
                               atol=1e-6, rtol=0)  # lookups travel as float32
    assert table.gather_visits().tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    discounted = BetaPosteriorTable(10, prior=2.0, decay=0.5)
    discounted.observe(torch.tensor([1]), torch.tensor([[1.0, 1.0]]))
    discounted.observe(torch.tensor([1]), torch.tensor([[0.0, 0.0]]))
    # alpha: 2 -> 0.5*2 + 1 + 2 = 4 -> 0.5*4 + 1 + 0 = 3; beta: 2 -> 2 -> 0.5*2 + 1 + 2 = 4
    assert float(discounted.alpha[1]) == 3.0 and float(discounted.beta_post[1]) == 4.0
    state = {name: value.clone() for name, value in table.state_tensors().items()}
    fresh = BetaPosteriorTable(10)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.gather_acc_est(), table.gather_acc_est())
    assert not hasattr(table, "apply_gradients")  # it learns from rewards, not from a loss


@pytest.mark.distributed
def test_oracle_accuracy_matches_the_groups_the_policy_then_samples(tmp_path):
    """--acc-estimator oracle on the 1-digit task after a warm start: the oracle's accuracy
    of each selected prompt against the accuracy of the 16 completions then sampled from it
    (one process, 12 steps x 8 prompts). If the oracle were exact, the residuals would have
    mean 0 and the binomial spread sqrt(p (1 - p) / 16); a wrong oracle (e.g. without the
    end token, or another temperature) misses both."""
    save = tmp_path / "oracle"
    flags = ["--task-max-digits", "1", "--task-num-prompts", "32", "--sft-warmup-iters", "150",
             "--num-prompts-per-step", "8", "--num-samples-per-prompt", "16",
             "--micro-batch-size", "16", "--lr", "1e-5", "--train-iters", "12",
             "--replay-per-step", "0", "--max-new-tokens", "4", "--acc-estimator", "oracle",
             "--log-prompt-accuracy", "--save", str(save), "--save-interval", "0"]
    result = launch_workers("megatron_paced.train", nprocs=1, args=flags, timeout_s=600)
    assert result.returncode == 0, result.output[-5000:]
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    est = torch.tensor([v for r in rows for v in r["prompt_acc_est"]], dtype=torch.float64)
    obs = torch.tensor([v for r in rows for v in r["prompt_acc_obs"]], dtype=torch.float64)
    assert len(est) == 96 and 0.1 < float(est.mean()) < 0.95, est
    binomial = (est * (1 - est) / 16).mean()
    residual = obs - est
    # The mean residual within 4 standard errors of 0; its variance the binomial one.
    assert abs(float(residual.mean())) < 4 * math.sqrt(float(binomial) / len(est)), (
        float(residual.mean()), float(binomial))
    assert 0.6 < float((residual ** 2).mean() / binomial) < 1.6, (
        float((residual ** 2).mean()), float(binomial))
