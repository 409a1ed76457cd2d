"""Per-token log-probabilities from vocabulary-parallel logits, without gathering the vocabulary.

With tensor parallelism each rank holds logits for a slice ``[v0, v0 + V/tp)`` of the
(padded) vocabulary. For a target token ``y``:

    log p(y) = z_y - m - log sum_v exp(z_v - m),      m = max_v z_v

computed with three all-reduces over the TP group of tensors of shape (B, T) -- the max, the
sum of exponentials and the target logit (held by exactly one rank) -- never (B, T, V). The
backward pass is local: d log p(y) / d z_v = 1[v = y] - softmax(z)_v on each rank's slice.
Vocabulary padding (rows Megatron adds so V divides by 128 x tp) is masked to -inf, so the
padded rows never take probability mass; the result equals ``log_softmax`` over the true
vocabulary.

Token alignment: for a (B, T) token tensor, entry ``[b, t]`` of the result is
``log p(tokens[b, t] | tokens[b, :t])``; column 0 has no context and is 0.

Usage::

    token_logprobs = vocab_parallel_log_probs(
        logits_shard,                      # (B, T, V/tp), this rank's vocab slice
        targets,                           # (B, T) token ids in [0, vocab_size)
        tp_group=ctx.tp_group, vocab_start=tp_rank * logits_shard.shape[-1],
        vocab_size=model_cfg.vocab_size)   # (B, T)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                tp_group: dist.ProcessGroup | None) -> torch.Tensor:
        distributed = tp_group is not None and dist.get_world_size(tp_group) > 1
        logits = logits.float()
        max_logit = logits.max(dim=-1).values  # (B, T)
        if distributed:
            dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=tp_group)
        shifted = logits - max_logit.unsqueeze(-1)
        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        num_local = logits.shape[-1]
        local_targets = targets - vocab_start
        owned = (local_targets >= 0) & (local_targets < num_local)
        gathered = shifted.gather(-1, local_targets.clamp(0, num_local - 1).unsqueeze(-1))
        target_logit = torch.where(owned, gathered.squeeze(-1), torch.zeros_like(sum_exp))
        if distributed:
            # One all-reduce for both sums: (2, B, T).
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
            sum_exp, target_logit = both[0], both[1]
        log_probs = target_logit - sum_exp.log()
        # The target is the greedy (argmax) token iff its logit equals the global max.
        is_argmax = target_logit >= 0
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, owned)
        ctx.mark_non_differentiable(is_argmax)
        return log_probs, is_argmax

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_is_argmax=None):
        softmax, local_targets, owned = ctx.saved_tensors
        grad = softmax.neg_()  # reuse the buffer: d/dz = onehot - softmax
        onehot_rows = owned.unsqueeze(-1).to(grad.dtype)
        index = local_targets.clamp(0, grad.shape[-1] - 1).unsqueeze(-1)
        grad.scatter_add_(-1, index, onehot_rows)
        grad.mul_(grad_output.unsqueeze(-1))
        return grad, None, None, None


def mask_vocab_padding(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocabulary rows (global id >= ``vocab_size``) to -inf."""
    num_local = logits.shape[-1]
    if vocab_start + num_local <= vocab_size:
        return logits
    ids = torch.arange(vocab_start, vocab_start + num_local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int,
    vocab_size: int,
    return_is_argmax: bool = False,
):
    """``log softmax(logits)[targets]`` over the TP-split, padded vocabulary. Shapes
    (..., V/tp) and (...) -> (...), float32. With ``return_is_argmax`` also a bool (...)
    tensor: whether each target is the argmax token (what greedy decoding would pick)."""
    logits = mask_vocab_padding(logits, vocab_start, vocab_size)
    log_probs, is_argmax = _VocabParallelLogProb.apply(logits, targets, vocab_start, tp_group)
    return (log_probs, is_argmax) if return_is_argmax else log_probs


def next_token_log_probs(
    logits: torch.Tensor, tokens: torch.Tensor, *, tp_group: dist.ProcessGroup | None,
    vocab_start: int, vocab_size: int, return_is_argmax: bool = False,
):
    """Log-prob of each token given the ones before it: (B, T, V/tp), (B, T) -> (B, T).

    ``logits[:, t]`` predicts ``tokens[:, t + 1]``; column 0 of the result is 0 (and, with
    ``return_is_argmax``, column 0 of the argmax flags is True).
    """
    log_probs, is_argmax = vocab_parallel_log_probs(
        logits[:, :-1], tokens[:, 1:], tp_group=tp_group, vocab_start=vocab_start,
        vocab_size=vocab_size, return_is_argmax=True,
    )  # (B, T-1)
    log_probs = torch.nn.functional.pad(log_probs, (1, 0))
    if not return_is_argmax:
        return log_probs
    return log_probs, torch.nn.functional.pad(is_argmax, (1, 0), value=True)


def sequence_log_probs(token_log_probs: torch.Tensor, completion_mask: torch.Tensor,
                       *, token_mean: bool = False) -> torch.Tensor:
    """Sum (or mean) of the completion tokens' log-probs: (B, T), (B, T) -> (B,)."""
    total = (token_log_probs * completion_mask).sum(dim=-1)
    if token_mean:
        return total / completion_mask.sum(dim=-1).clamp(min=1)
    return total
