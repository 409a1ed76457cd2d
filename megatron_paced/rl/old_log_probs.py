"""The old-log-probs stage of one RL step: the anchor pi_old (and the KL reference pi_ref) of
every row of the train batch, computed by the trainer's Megatron models.

``build_train_batch`` fills ``extras["old_log_probs"]`` with the log-probs of the policy that
generated each row (the rollout engine's). Unless ``--use-rollout-logprobs``, the fresh rows'
are replaced by a recompute with the current policy (which is pi_old: it has not stepped
yet); replayed rows keep their generator's. With a reference model (FlowRL, GRPO with a KL
term) ``extras["ref_log_probs"]`` holds its log-probs of every row. Both are forward passes
through Megatron's schedule (no grad), on every PP stage.

Usage::

    attach_old_log_probs(batch, num_fresh=P * G, policy=policy, reference=None, ctx=ctx,
                         vocab_size=V, micro_batch_size=4, recompute=True)
    batch.extras["old_log_probs"]          # (B, T)
"""

from __future__ import annotations

import torch

from megatron_paced.forward_backward import SequenceBatch, compute_log_probs
from megatron_paced.rl.optimize import micro_batch_size_for


def attach_old_log_probs(batch: SequenceBatch, *, num_fresh: int, policy, reference, ctx,
                         vocab_size: int, micro_batch_size: int, recompute: bool) -> None:
    """Set ``batch.extras["old_log_probs"]`` (its first ``num_fresh`` rows recomputed by
    ``policy`` if ``recompute``) and, if ``reference`` is given, ``"ref_log_probs"``
    (collective over the model's groups); ``micro_batch_size`` is --micro-batch-size."""
    if recompute:
        fresh_rows = batch.rows(0, num_fresh)
        recomputed = compute_log_probs(
            policy.model, fresh_rows, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(num_fresh, micro_batch_size))
        batch.extras["old_log_probs"] = torch.cat([recomputed.token_log_probs.cpu(),
                                                   batch.extras["old_log_probs"][num_fresh:]])
    if reference is not None:
        batch.extras["ref_log_probs"] = compute_log_probs(
            reference.model, batch, ctx, vocab_size=vocab_size,
            micro_batch_size=micro_batch_size_for(batch.num_sequences, micro_batch_size),
        ).token_log_probs.cpu()
