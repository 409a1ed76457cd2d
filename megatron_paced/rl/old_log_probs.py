"""The old-log-probs stage of one RL step: the anchor pi_old (and the KL reference pi_ref) of
every row of the train batch, computed by the trainer's Megatron models.

``build_train_batch`` fills the batch's ``old_log_probs`` with the log-probs of the policy
that generated each row (the rollout engine's); this stage returns a copy of the batch with
the anchor in their place (the batch it is given is not changed). With ``--old-log-probs
recompute`` (the default), the fresh rows' are replaced by a recompute with the current policy
(which is pi_old: it has not stepped yet; with ``--max-staleness K`` the samples came from
the weights K steps older, and the anchor is still pi_old); ``--old-log-probs engine`` keeps
the generating weights' as the anchor. The gap between the two is measured on the fresh rows (the train/inference
drift, :func:`log_prob_drift`). The replayed rows are recomputed too unless
``--replay-old-log-probs generation`` (they then keep the log-probs of the older policy that
generated them, a different anchor). With a reference model (FlowRL, GRPO with a KL term)
``ref_log_probs`` holds its log-probs of every row. Both are forward passes through
Megatron's schedule (no grad), on every PP stage.

After the optimizer step, :func:`beta_kl_old_new` measures the premise of Proposition 4.1
(``beta * KL(pi_old || pi_theta)`` small; the paper reports below 4e-3) on the step's fresh
samples, which pi_old generated: beta times the mean over them of S_old - S_new, the sequence
log-probs over the completion under pi_old and the updated policy.

Usage::

    batch, drift = attach_old_log_probs(batch, num_fresh=P * G, policy=policy,
                                        reference=None, dp_group=ctx.dp_group,
                                        recompute=True)  # drift: {"old_logprob_drift_abs": ...}
    batch.old_log_probs                    # (B, T)
    ... optimizer step ...
    beta_kl_old_new(batch, num_fresh=P * G, policy=policy, dp_group=ctx.dp_group,
                    beta=0.05)             # a float, same on every rank
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_paced.rl.batch import RLBatch


def attach_old_log_probs(batch: RLBatch, *, num_fresh: int, policy, reference, dp_group,
                         recompute: bool, recompute_replayed: bool = True,
                         measure_drift: bool = False) -> tuple[RLBatch, dict]:
    """``batch`` with pi_old's ``old_log_probs`` and, if ``reference`` is given, its
    ``ref_log_probs`` (collective over the models' groups). ``recompute``: the first
    ``num_fresh`` rows by ``policy``; ``recompute_replayed``: the rest (the replayed rows) too,
    so that every sample of a prompt shares the anchor pi_old of the TB target
    ``pi_old(y|x) exp(r / beta) / Z(x)``; rows not recomputed keep their generator's.

    Also returns the train/inference drift of the fresh rows (:func:`log_prob_drift`: the
    engine's log-probs against pi_old's recompute) when they are recomputed or
    ``measure_drift`` asks for it (a forward pass of its own with ``recompute`` False), else
    {}."""
    num_rows = batch.num_sequences
    start = 0 if recompute else num_fresh
    stop = num_rows if recompute_replayed else num_fresh
    engine = batch.old_log_probs  # the generators'
    drift: dict = {}
    if measure_drift and not recompute and num_fresh:
        fresh = batch.rows(0, num_fresh)
        drift = log_prob_drift(engine[:num_fresh], policy.log_probs(fresh).token_log_probs.cpu(),
                               fresh.completion_mask, dp_group)
    old = engine
    if start < stop:
        old = engine.clone()
        old[start:stop] = policy.log_probs(batch.rows(start, stop)).token_log_probs.cpu()
        if recompute and num_fresh:
            drift = log_prob_drift(engine[:num_fresh], old[:num_fresh],
                                   batch.completion_mask[:num_fresh], dp_group)
    ref = None if reference is None else reference.log_probs(batch).token_log_probs.cpu()
    return dataclasses.replace(batch, old_log_probs=old, ref_log_probs=ref), drift


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


def beta_kl_old_new(batch: RLBatch, *, num_fresh: int, policy, dp_group, beta: float) -> float:
    """beta * mean over the first ``num_fresh`` rows (all DP ranks) of S_old - S_new, S_new
    by ``policy`` now (collective): the Monte-Carlo beta * KL(pi_old || pi_theta)."""
    fresh = batch.rows(0, num_fresh)
    new = policy.log_probs(fresh).token_log_probs.cpu()
    per_sequence = ((fresh.old_log_probs - new) * fresh.completion_mask).sum(1)
    totals = torch.tensor([float(per_sequence.sum()), float(num_fresh)], dtype=torch.float64)
    dist.all_reduce(totals, group=dp_group)
    return beta * float(totals[0] / totals[1])
