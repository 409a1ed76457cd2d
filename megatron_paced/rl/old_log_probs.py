"""The old-log-probs stage of one RL step: the anchor pi_old (and the KL reference pi_ref) of
every row of the train batch, computed by the trainer's Megatron models.

``build_train_batch`` fills ``extras["old_log_probs"]`` with the log-probs of the policy that
generated each row (the rollout engine's). With ``--old-log-probs recompute`` (the default),
the fresh rows' are replaced by a recompute with the current policy (which is pi_old: it has
not stepped yet; with ``--max-staleness K`` the samples came from the weights K steps older,
and the anchor is still pi_old); ``--old-log-probs engine`` keeps the generating weights'
as the anchor. The gap between the two is measured on the fresh rows (the train/inference
drift, :func:`log_prob_drift`). The replayed rows are recomputed too unless
``--replay-old-log-probs generation`` (they then keep the log-probs of the older policy that
generated them, a different anchor). With a reference model (FlowRL, GRPO with a KL term)
``extras["ref_log_probs"]`` holds its log-probs of every row. Both are forward passes through
Megatron's schedule (no grad), on every PP stage.

After the optimizer step, :func:`beta_kl_old_new` measures the premise of Proposition 4.1
(``beta * KL(pi_old || pi_theta)`` small; the paper reports below 4e-3) on the step's fresh
samples, which pi_old generated: beta times the mean over them of S_old - S_new, the sequence
log-probs over the completion under pi_old and the updated policy.

Usage::

    drift = attach_old_log_probs(batch, num_fresh=P * G, policy=policy, reference=None,
                                 ctx=ctx, vocab_size=V, micro_batch_size=4, recompute=True,
                                 recompute_replayed=True)   # {"old_logprob_drift_abs": ...}
    batch.extras["old_log_probs"]          # (B, T)
    ... optimizer step ...
    beta_kl_old_new(batch, num_fresh=P * G, policy=policy, ctx=ctx, vocab_size=V,
                    micro_batch_size=4, beta=0.05)         # a float, same on every rank
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_paced.forward_backward import SequenceBatch, compute_log_probs, micro_batch_size_for


def attach_old_log_probs(batch: SequenceBatch, *, num_fresh: int, policy, reference, ctx,
                         vocab_size: int, micro_batch_size: int, recompute: bool,
                         recompute_replayed: bool = True, measure_drift: bool = False) -> dict:
    """Set ``batch.extras["old_log_probs"]`` and, if ``reference`` is given,
    ``"ref_log_probs"`` (collective over the model's groups). ``recompute``: the first
    ``num_fresh`` rows by ``policy``; ``recompute_replayed``: the rest (the replayed rows) too,
    so that every sample of a prompt shares the anchor pi_old of the TB target
    ``pi_old(y|x) exp(r / beta) / Z(x)``; rows not recomputed keep their generator's.
    ``micro_batch_size`` is --micro-batch-size.

    Returns the train/inference drift of the fresh rows (:func:`log_prob_drift`: the
    engine's log-probs against pi_old's recompute) when they are recomputed or
    ``measure_drift`` asks for it (a forward pass of its own with ``recompute`` False), else
    {}."""
    num_rows = batch.num_sequences
    start = 0 if recompute else num_fresh
    stop = num_rows if recompute_replayed else num_fresh
    drift: dict = {}
    if measure_drift and not recompute and num_fresh:
        fresh = SequenceBatch(batch.tokens[:num_fresh], batch.completion_mask[:num_fresh], {})
        drift = log_prob_drift(batch.extras["old_log_probs"][:num_fresh], compute_log_probs(
            policy.model, fresh, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(num_fresh, micro_batch_size),
        ).token_log_probs.cpu(), fresh.completion_mask, ctx.dp_group)
    if start < stop:
        rows = SequenceBatch(batch.tokens[start:stop], batch.completion_mask[start:stop], {})
        recomputed = compute_log_probs(
            policy.model, rows, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(stop - start, micro_batch_size))
        engine = batch.extras["old_log_probs"]  # the generators' (replaced, not changed)
        old = engine.clone()
        old[start:stop] = recomputed.token_log_probs.cpu()
        batch.extras["old_log_probs"] = old
        if recompute and num_fresh:
            drift = log_prob_drift(engine[:num_fresh],
                                   old[:num_fresh], batch.completion_mask[:num_fresh],
                                   ctx.dp_group)
    if reference is not None:
        batch.extras["ref_log_probs"] = compute_log_probs(
            reference.model, batch, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(num_rows, micro_batch_size),
        ).token_log_probs.cpu()
    return drift


def log_prob_drift(engine: torch.Tensor, recomputed: torch.Tensor, mask: torch.Tensor,
                   dp_group) -> dict:
    """How far the generating engine's log-probs are from pi_old's recompute on the same
    samples (the train/inference mismatch, plus the policy's change over the staleness):
    ``old_logprob_drift_abs``, the mean over completion tokens of |log p_engine - log p_old|,
    and ``old_logprob_drift_kl``, the mean over sequences of S_engine - S_old (a Monte-Carlo
    KL(pi_engine || pi_old), the samples being the engine's). Means over all DP ranks
    (collective)."""
    diff = (engine - recomputed) * mask
    totals = torch.tensor([float(diff.abs().sum()), float(mask.sum()), float(diff.sum()),
                           float(len(mask))], dtype=torch.float64)
    dist.all_reduce(totals, group=dp_group)
    return {"old_logprob_drift_abs": float(totals[0] / totals[1].clamp(min=1)),
            "old_logprob_drift_kl": float(totals[2] / totals[3].clamp(min=1))}


def beta_kl_old_new(batch: SequenceBatch, *, num_fresh: int, policy, ctx, vocab_size: int,
                    micro_batch_size: int, beta: float) -> float:
    """beta * mean over the first ``num_fresh`` rows (all DP ranks) of S_old - S_new, S_new
    by ``policy`` now (collective): the Monte-Carlo beta * KL(pi_old || pi_theta)."""
    fresh = SequenceBatch(batch.tokens[:num_fresh], batch.completion_mask[:num_fresh], {})
    new = compute_log_probs(policy.model, fresh, ctx, vocab_size=vocab_size,
                            micro_batch_size=micro_batch_size_for(num_fresh, micro_batch_size))
    old = batch.extras["old_log_probs"][:num_fresh]
    per_sequence = ((old - new.token_log_probs.cpu()) * fresh.completion_mask).sum(1)
    totals = torch.tensor([float(per_sequence.sum()), float(num_fresh)], dtype=torch.float64)
    dist.all_reduce(totals, group=ctx.dp_group)
    return beta * float(totals[0] / totals[1])
