"""Losses in Megatron's ``loss_func`` contract: pure functions on tensors.

Every loss takes the (b, T) token log-probs of a micro-batch and the micro-batch itself and
returns ``(loss_sum, num_items, logs)``. Megatron sums ``loss_sum`` and ``num_items`` over
micro-batches and data-parallel ranks and divides the gradients once by the total
(``calculate_per_token_loss=True``), so the result does not depend on the split.

    nll_loss:  loss_sum = -sum_{completion tokens} log p(y_t | x, y_<t),
               num_items = number of completion tokens          (per-token mean NLL)

Usage::

    forward_backward(policy.model, batch, nll_loss, ctx, vocab_size=..., micro_batch_size=2)
"""

from __future__ import annotations

import torch


def nll_loss(token_log_probs: torch.Tensor, micro_batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Supervised negative log-likelihood of the completion tokens (normalizer: tokens)."""
    mask = micro_batch.completion_mask
    loss_sum = -(token_log_probs * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"nll_sum": loss_sum.detach().clone(),
                                  "num_tokens": num_tokens.detach().clone()}
