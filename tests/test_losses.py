"""The loss equations, checked against hand computations and autograd."""

from __future__ import annotations

import pytest
import torch

from megatron_paced.losses import (
    check_beta, flowrl_loss_fn, group_normalized_advantages, grpo_loss_fn, grpo_token_losses,
    paced_loss_fn, paced_tb_delta,
)
from megatron_paced.rl.batch import RLBatch


def _batch(**fields):
    """Two rows of the RL batch the losses read; fields a test leaves out are zeros."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    zeros = torch.zeros(2)
    defaults = dict(log_z_rows=torch.arange(2), updates_log_z=torch.ones(2, dtype=torch.bool),
                    rewards=zeros, advantages=zeros, old_log_probs=torch.zeros(2, 4))
    return RLBatch(torch.zeros(2, 4, dtype=torch.long), mask, **{**defaults, **fields})


def test_paced_delta_and_loss_contract():
    torch.testing.assert_close(
        paced_tb_delta(torch.tensor([10.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                       torch.tensor([1.0]), 0.05), torch.tensor([10 - 3 + 2 - 20.0]))
    token_lp = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -1.0, -1.0, -1.0]],
                            requires_grad=True)
    log_z = torch.tensor([10.0, 12.0], requires_grad=True)
    batch = _batch(log_z=log_z, old_log_probs=token_lp.detach() - 0.5,
                   rewards=torch.tensor([1.0, 0.0]))
    loss_sum, num, logs = paced_loss_fn(token_lp, batch, beta=0.05)
    # S_theta - S_old = +1.0 (2 tokens) and +1.5 (3 tokens)
    delta = torch.tensor([10 + 1.0 - 20, 12 + 1.5])
    torch.testing.assert_close(loss_sum, (delta ** 2).sum())
    assert int(num) == 2
    torch.testing.assert_close(logs["kl_old_theta_sum"], torch.tensor(-2.5))
    loss_sum.backward()
    torch.testing.assert_close(log_z.grad, 2 * delta)
    assert token_lp.grad[0, 3] == 0 and token_lp.grad[0, 1] == 2 * delta[0]


def test_paced_nan_reward_raises():
    token_lp = torch.zeros(2, 4)
    batch = _batch(log_z=torch.zeros(2), old_log_probs=token_lp,
                   rewards=torch.tensor([float("nan"), 0.0]))
    with pytest.raises(FloatingPointError, match="nothing is written"):
        paced_loss_fn(token_lp, batch, beta=0.05)


def test_flowrl_follows_its_recipe_token_means_advantages_and_sequence_weight():
    token_lp = torch.tensor([[0.0, -1.0, -3.0, 0.0], [0.0, -1.0, -1.0, -1.0]])
    log_z = torch.tensor([5.0, 5.0], requires_grad=True)
    batch = _batch(log_z=log_z, old_log_probs=token_lp - torch.tensor([[0.0], [1.0]]),
                   ref_log_probs=token_lp - 0.5, rewards=torch.tensor([1.0, 0.0]),
                   advantages=torch.tensor([0.7, -0.7]))
    loss_sum, num, logs = flowrl_loss_fn(token_lp, batch)  # c = 15, w_max = 10
    delta = torch.tensor([5 + 0.5 - 15 * 0.7, 5 + 0.5 + 15 * 0.7])
    # S_theta - S_old: 0 (weight 1) and +3 over 3 tokens (e^3 = 20.1, clipped to 10)
    weight = torch.tensor([1.0, 10.0])
    torch.testing.assert_close(loss_sum, (weight * delta ** 2).sum())
    assert int(num) == 2 and float(logs["log_z_sum"]) == 10.0
    loss_sum.backward()
    torch.testing.assert_close(log_z.grad, 2 * weight * delta)
    raw, _, _ = flowrl_loss_fn(token_lp, batch, reward="reward", reward_scale=20.0,
                               weight_max=1.5)
    delta = torch.tensor([5 + 0.5 - 20.0, 5 + 0.5])
    torch.testing.assert_close(raw, (torch.tensor([1.0, 1.5]) * delta ** 2).sum())


def test_grpo_advantages_and_clipping():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_normalized_advantages(rewards, groups)
    torch.testing.assert_close(adv[:3].sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert adv[0] > 0 > adv[1] and adv[3] < 0 < adv[4]
    torch.testing.assert_close(group_normalized_advantages(torch.ones(4), torch.zeros(4)),
                               torch.zeros(4))
    lp, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])  # ratio e^0.5 = 1.65
    torch.testing.assert_close(grpo_token_losses(lp, old, torch.tensor([1.0]), clip_low=0.2,
                                                 clip_high=0.2), torch.tensor([[-1.2]]))
    torch.testing.assert_close(grpo_token_losses(lp, old, torch.tensor([-1.0]), clip_low=0.2,
                                                 clip_high=0.2), -(-torch.exp(lp)))
    kl = grpo_token_losses(lp, lp, torch.tensor([0.0]), clip_low=0.2, clip_high=0.2,
                           ref_token_log_probs=lp - 1.0, kl_coef=0.1)
    torch.testing.assert_close(kl, 0.1 * (torch.exp(torch.tensor([[-1.0]])) + 1 - 1))
    token_lp = torch.zeros(2, 4)
    batch = _batch(old_log_probs=token_lp, advantages=torch.tensor([1.0, -1.0]))
    loss_sum, num_tokens, _ = grpo_loss_fn(token_lp, batch)
    assert int(num_tokens) == 5 and float(loss_sum) == pytest.approx(-2 + 3)
    # A padding position whose log-prob is very negative: its k3 term is masked before the
    # exponential (exp(1000) overflows, and inf x 0 would be NaN).
    padded = token_lp.clone().requires_grad_(True)
    with torch.no_grad():
        padded[:, 0] = -1000.0  # outside the completion mask
    batch = _batch(old_log_probs=token_lp, advantages=torch.tensor([1.0, -1.0]),
                   ref_log_probs=token_lp)
    loss_sum, _, _ = grpo_loss_fn(padded, batch, kl_coef=0.1)
    assert float(loss_sum) == pytest.approx(-2 + 3)
    loss_sum.backward()
    assert torch.isfinite(padded.grad).all()


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="--beta"):
        check_beta(beta)
