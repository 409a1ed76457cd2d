"""Losses as pure functions on tensors, and their adapters to Megatron's ``loss_func`` contract.

Notation: x a prompt, y a completion, r in [0, 1] its reward, beta the KL coefficient,
S(y|x) = sum_t log pi(y_t | x, y_<t) over the completion tokens, |y| their number.

PACED-RL (trajectory balance against the policy that generated y, arXiv 2602.12642)::

    delta(x, y) = log_z[x] + S_theta(y|x) - S_old(y|x) - r(x, y) / beta
    loss        = mean over samples of delta^2

  At the optimum beta * log_z[x] = p_old(x) + beta * KL(pi_old || pi_theta) (Proposition 4.1),
  so ``beta * log_z`` estimates the online accuracy of x. With ``token_mean`` the two S terms
  are divided by |y|.

FlowRL (trajectory balance against the frozen reference, token-mean log-probs, arXiv
2509.15207, as its released recipe computes it)::

    delta  = log_z(x) + S_theta(y|x) / |y| - S_ref(y|x) / |y| - c * A(x, y)
    w      = min(exp(S_theta(y|x) - S_old(y|x)), w_max), no gradient
    loss   = mean over samples of w * delta^2

  with A the group-normalized reward (GRPO's advantage; or the raw reward r), c = 15 and
  w_max = 10 (the recipe's), and log_z(x) from its ``ProjZ`` head on the prompt's hidden
  states (:mod:`megatron_paced.models.proj_z`) or from the per-prompt table.

GRPO (group-normalized advantages, PPO-clipped ratio, optional k3 KL to the reference)::

    A_i    = (r_i - mean_group(r)) / (std_group(r) + 1e-6)
    rho_t  = exp(log pi_theta(y_t) - log pi_old(y_t))
    l_t    = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)
             + kl_coef * (exp(ref_t - theta_t) - (ref_t - theta_t) - 1)
    loss   = mean over completion tokens of l_t           (token-level, as in DAPO)

The Megatron adapters (``paced_loss_fn`` ...) take the micro-batch's (b, T) token log-probs
and the micro-batch's :class:`~megatron_paced.rl.batch.RLBatch` (its named per-sequence
tensors), and return ``(loss_sum, num_items, logs)``: Megatron divides the model
gradients once by the global ``num_items`` (sequences for the TB losses, tokens for GRPO and
the NLL). The batch's ``log_z`` is a leaf tensor requiring grad; its gradient is the raw
per-sample ``d loss_sum / d log_z = 2 delta`` (the log-Z table normalizes per prompt).

Usage::

    loss_fn = functools.partial(paced_loss_fn, beta=0.05)
    policy.forward_backward(batch, loss_fn)        # batch: an RLBatch with log_z set
"""

from __future__ import annotations

import math

import torch

from megatron_paced.config import ConfigError


def check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"--beta {beta!r}: must be a finite number > 0")


def paced_tb_delta(log_z: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                   rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """PACED-RL trajectory-balance residual per sample: all (B,) -> (B,)."""
    return log_z + log_probs - old_log_probs - rewards / beta


def flowrl_delta_and_weight(
    log_z: torch.Tensor, mean_log_probs: torch.Tensor, mean_ref_log_probs: torch.Tensor,
    log_ratio: torch.Tensor, log_rewards: torch.Tensor, weight_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowRL residual and its clipped (no-grad) importance weight per sample: (B,) each.
    ``log_ratio`` is S_theta - S_old (a sequence sum), ``log_rewards`` c * A."""
    delta = log_z + mean_log_probs - mean_ref_log_probs - log_rewards
    weight = torch.exp(log_ratio.detach()).clamp(max=weight_max)
    return delta, weight


def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                                eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, over the group's std (B,) -> (B,)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, inverse, rewards)
    means = sums / counts
    sq = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(
        0, inverse, (rewards - means[inverse]) ** 2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    return (rewards - means[inverse]) / (std[inverse] + eps)


def grpo_token_losses(
    token_log_probs: torch.Tensor, old_token_log_probs: torch.Tensor,
    advantages: torch.Tensor, *, clip_low: float, clip_high: float,
    ref_token_log_probs: torch.Tensor | None = None, kl_coef: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO per-token loss (B, T): clipped surrogate plus optional k3 KL to the reference.
    ``mask`` (B, T): the completion tokens; the log-ratios are zeroed outside it before they
    are exponentiated (a padding position's log-prob may be very negative: exp would
    overflow, and inf x 0 is NaN)."""
    keep = torch.ones_like(token_log_probs) if mask is None else mask
    ratio = torch.exp((token_log_probs - old_token_log_probs) * keep)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    loss = -surrogate
    if ref_token_log_probs is not None and kl_coef > 0:
        log_ratio = (ref_token_log_probs - token_log_probs) * keep
        loss = loss + kl_coef * (torch.exp(log_ratio) - log_ratio - 1)
    return loss


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        bad = value[~torch.isfinite(value)].flatten()[:4].tolist()
        raise FloatingPointError(f"non-finite {name}: {bad} (the step is aborted; nothing "
                                 "is written to the log-Z table)")


def _num(value: float | int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int, device=like.device)


def nll_loss(token_log_probs: torch.Tensor, micro_batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Supervised negative log-likelihood of the completion tokens (normalizer: tokens)."""
    mask = micro_batch.completion_mask
    loss_sum = -(token_log_probs * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"nll_sum": loss_sum.detach().clone(),
                                  "num_tokens": num_tokens.detach().clone()}


def paced_loss_fn(token_log_probs: torch.Tensor, micro_batch, *, beta: float,
                  token_mean: bool = False):
    """PACED-RL TB loss in Megatron's contract (normalizer: sequences).

    Reads ``log_z`` (b,) leaf requiring grad, ``old_log_probs`` (b, T), ``rewards`` (b,).
    Logs the per-sample ``delta`` and the sample estimate of KL(pi_old || pi_theta).
    """
    mask = micro_batch.completion_mask
    log_probs = (token_log_probs * mask).sum(-1)
    old_log_probs = (micro_batch.old_log_probs * mask).sum(-1)
    if token_mean:
        lengths = mask.sum(-1).clamp(min=1)
        log_probs, old_log_probs = log_probs / lengths, old_log_probs / lengths
    delta = paced_tb_delta(micro_batch.log_z, log_probs, old_log_probs, micro_batch.rewards,
                           beta)
    _check_finite("PACED loss residual", delta.detach())
    loss_sum = (delta ** 2).sum()
    return loss_sum, _num(delta.numel(), delta), {
        "loss_sum": loss_sum.detach().clone(),
        "kl_old_theta_sum": (old_log_probs - log_probs).detach().sum(),
        "num_sequences": _num(delta.numel(), delta),
    }


def flowrl_loss_fn(token_log_probs: torch.Tensor, micro_batch, *, reward_scale: float = 15.0,
                   reward: str = "advantage", weight_max: float = 10.0):
    """FlowRL loss in Megatron's contract (normalizer: sequences).

    Reads ``log_z`` (b,), ``old_log_probs``, ``ref_log_probs`` (b, T), ``advantages``
    (``reward="advantage"``) or ``rewards`` (``"reward"``) (b,).
    """
    mask = micro_batch.completion_mask
    lengths = mask.sum(-1).clamp(min=1)
    log_probs = (token_log_probs * mask).sum(-1)
    old_log_probs = (micro_batch.old_log_probs * mask).sum(-1)
    ref_log_probs = (micro_batch.ref_log_probs * mask).sum(-1)
    log_rewards = reward_scale * (micro_batch.advantages if reward == "advantage"
                                  else micro_batch.rewards)
    delta, weight = flowrl_delta_and_weight(
        micro_batch.log_z, log_probs / lengths, ref_log_probs / lengths,
        log_probs - old_log_probs, log_rewards, weight_max)
    _check_finite("FlowRL loss residual", delta.detach())
    loss_sum = (weight * delta ** 2).sum()
    return loss_sum, _num(delta.numel(), delta), {
        "loss_sum": loss_sum.detach().clone(), "num_sequences": _num(delta.numel(), delta),
        "log_z_sum": micro_batch.log_z.detach().float().sum()}


def grpo_loss_fn(token_log_probs: torch.Tensor, micro_batch, *, clip_low: float = 0.2,
                 clip_high: float = 0.2, kl_coef: float = 0.0):
    """GRPO loss in Megatron's contract (normalizer: completion tokens).

    Reads ``old_log_probs`` (b, T), ``advantages`` (b,), and ``ref_log_probs`` (b, T) when
    ``kl_coef > 0``.
    """
    mask = micro_batch.completion_mask
    per_token = grpo_token_losses(
        token_log_probs, micro_batch.old_log_probs, micro_batch.advantages, clip_low=clip_low,
        clip_high=clip_high, ref_token_log_probs=micro_batch.ref_log_probs, kl_coef=kl_coef,
        mask=mask)
    loss_sum = (per_token * mask).sum()
    _check_finite("GRPO loss", loss_sum.detach())
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach().clone(),
                                  "num_tokens": num_tokens.detach().clone()}
