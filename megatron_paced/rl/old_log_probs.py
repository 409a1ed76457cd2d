"""The old-log-probs stage of one RL step: the anchor pi_old (and the KL reference pi_ref) of
every row of the train batch, computed by the trainer's Megatron models.

``build_train_batch`` fills ``extras["old_log_probs"]`` with the log-probs of the policy that
generated each row (the rollout engine's). Unless ``--use-rollout-logprobs``, the fresh rows'
are replaced by a recompute with the current policy (which is pi_old: it has not stepped
yet); so are the replayed rows' unless ``--replay-old-log-probs generation`` (they then keep
the log-probs of the older policy that generated them, a different anchor). With a reference
model (FlowRL, GRPO with a KL term) ``extras["ref_log_probs"]`` holds its log-probs of every
row. Both are forward passes through Megatron's schedule (no grad), on every PP stage.

After the optimizer step, :func:`beta_kl_old_new` measures the premise of Proposition 4.1
(``beta * KL(pi_old || pi_theta)`` small; the paper reports below 4e-3) on the step's fresh
samples, which pi_old generated: beta times the mean over them of S_old - S_new, the sequence
log-probs over the completion under pi_old and the updated policy.

Usage::

    attach_old_log_probs(batch, num_fresh=P * G, policy=policy, reference=None, ctx=ctx,
                         vocab_size=V, micro_batch_size=4, recompute=True,
                         recompute_replayed=True)
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
                         recompute_replayed: bool = True) -> None:
    """Set ``batch.extras["old_log_probs"]`` and, if ``reference`` is given,
    ``"ref_log_probs"`` (collective over the model's groups). ``recompute``: the first
    ``num_fresh`` rows by ``policy``; ``recompute_replayed``: the rest (the replayed rows) too,
    so that every sample of a prompt shares the anchor pi_old of the TB target
    ``pi_old(y|x) exp(r / beta) / Z(x)``; rows not recomputed keep their generator's.
    ``micro_batch_size`` is --micro-batch-size."""
    num_rows = batch.num_sequences
    start = 0 if recompute else num_fresh
    stop = num_rows if recompute_replayed else num_fresh
    if start < stop:
        rows = SequenceBatch(batch.tokens[start:stop], batch.completion_mask[start:stop], {})
        recomputed = compute_log_probs(
            policy.model, rows, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(stop - start, micro_batch_size))
        old = batch.extras["old_log_probs"].clone()
        old[start:stop] = recomputed.token_log_probs.cpu()
        batch.extras["old_log_probs"] = old
    if reference is not None:
        batch.extras["ref_log_probs"] = compute_log_probs(
            reference.model, batch, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(num_rows, micro_batch_size),
        ).token_log_probs.cpu()


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
