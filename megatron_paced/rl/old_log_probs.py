"""The old-log-probs stage of one RL step: the anchor pi_old (and the KL reference pi_ref) of
every row of the train batch, computed by the trainer's Megatron models.

``build_train_batch`` fills the batch's ``old_log_probs`` with the log-probs of the policy
that generated each row (the rollout engine's); this stage returns a copy of the batch with
the anchor in their place (the batch it is given is not changed). With ``--old-log-probs
recompute`` (the default), the fresh rows' are replaced by a recompute with the current policy
(which is pi_old: it has not stepped yet; with ``--max-staleness K`` the samples came from
the weights K steps older, and the anchor is still pi_old); ``--old-log-probs engine`` keeps
the generating weights' as the anchor. The gap between the two is measured on the fresh rows
(the train/inference drift, :func:`log_prob_drift`). The replayed rows are recomputed too unless
``--replay-old-log-probs generation`` (they then keep the log-probs of the older policy that
generated them, a different anchor). With a reference model (FlowRL, GRPO with a KL term)
``ref_log_probs`` holds its log-probs of every row. Both are forward passes through
Megatron's schedule (no grad), on every PP stage.

The premise of Proposition 4.1 (``beta * KL(pi_old || pi_theta)`` small; the paper reports
below 4e-3) is measured on samples the update did not use (:func:`kl_probe`): fresh
completions of the step's prompts from pi_old, drawn before the update, whose S_old is
recomputed; after the update ``beta * mean(S_old - S_new)`` is an unbiased Monte-Carlo
estimate. On the samples the step trained on the same mean is biased at O(lr) (the update
raised exactly those samples' S_new), while the KL itself is O(lr^2).

Usage::

    batch, drift = attach_old_log_probs(batch, num_fresh=P * G, policy=policy,
                                        reference=None, dp_group=ctx.dp_group,
                                        recompute=True)  # drift: {"old_logprob_drift_abs": ...}
    batch.old_log_probs                    # (B, T)
    probe = kl_probe(collector, problems, policy, num_samples=8, seed=s, step=step)
    ... optimizer step ...
    probe.beta_kl(policy, dp_group=ctx.dp_group, beta=0.05)   # same on every rank
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_paced.rl.batch import RLBatch
from megatron_paced.rollout.engine import RolloutBatch, completions_to_batch


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


def sequence_kl(old_token_log_probs: torch.Tensor, new_token_log_probs: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """(B,) S_old - S_new of each sequence over its completion tokens: on samples of pi_old,
    its mean is a Monte-Carlo KL(pi_old || pi_new) (unbiased when the samples are fresh)."""
    return ((old_token_log_probs - new_token_log_probs) * mask).sum(-1)


@dataclass
class KLProbe:
    """Fresh samples of pi_old, not trained on, with their S_old (pi_old's recompute)."""

    batch: RolloutBatch
    old_token_log_probs: torch.Tensor

    def beta_kl(self, policy, *, dp_group, beta: float) -> float:
        """beta * the mean over every DP rank's probe sequences of S_old - S_new, S_new by
        ``policy`` now (collective): the Monte-Carlo beta * KL(pi_old || pi_theta)."""
        new = policy.log_probs(self.batch).token_log_probs.cpu()
        per_sequence = sequence_kl(self.old_token_log_probs, new, self.batch.completion_mask)
        totals = torch.tensor([float(per_sequence.sum()), float(len(per_sequence))],
                              dtype=torch.float64)
        dist.all_reduce(totals, group=dp_group)
        return beta * float(totals[0] / totals[1].clamp(min=1))


def kl_probe(collector, problems: list, policy, *, num_samples: int, seed: int,
             step: int) -> KLProbe:
    """``num_samples`` fresh completions of each problem from the backend's current weights
    (pi_old, before the update; neither trained on nor counted) and their S_old
    (collective)."""
    completions = collector.generate(problems, num_samples, seed, step)
    prompts = [collector.task.prompt_tokens(p) for p in problems]
    batch = completions_to_batch(prompts, completions, collector.seq_length)
    return KLProbe(batch, policy.log_probs(batch).token_log_probs.cpu())
