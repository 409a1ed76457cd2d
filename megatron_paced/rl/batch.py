"""The train batch of one RL step on one DP rank: fresh groups plus replayed samples.

A pure function of tensors (no model, no process group): the fresh rows come in (prompt,
sample) order, ``G`` samples per prompt, followed by the replayed rows. Each row carries the
log-Z row of its prompt, its reward, its GRPO advantage (reward minus its group's mean over
the group's std; a replayed row is a group of its own, advantage 0), whether its log-Z
gradient reaches the table, and, as ``old_log_probs``, the log-probs of the policy that
generated it (the old-log-probs stage returns a copy with pi_old's recompute). The rows are
an :class:`RLBatch`, B = P * G + num_replayed rows of named tensors.

Only fresh rows update the table: Proposition 4.1 (beta * log_z -> the accuracy of pi_old) is
a statement about samples from pi_old, and the replay holds successes chosen for their
estimate error, whose mean reward is not the prompt's accuracy (one replayed success counted
like a whole group pulled a row seen only through replay from 0.5 to 1.0 at lr 0.5).
Replayed rows still train the policy, against the current log_z (``--replay-updates-log-z``
lets them move the table too, an ablation: docs/results.md).

Usage::

    batch = build_train_batch(prompt_rows, fresh, rewards, replayed)
    batch.rows(0, prompt_rows.numel() * rewards.shape[1])        # the fresh rows
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_paced.forward_backward import SequenceBatch
from megatron_paced.losses import group_normalized_advantages
from megatron_paced.paced.replay import ReplaySample
from megatron_paced.rollout.engine import RolloutBatch


@dataclass
class RLBatch(SequenceBatch):
    """The train rows of one RL step on one DP rank: what every loss reads."""

    log_z_rows: torch.Tensor
    """(B,) int64 log-Z row (dataset index) of each row's prompt."""
    updates_log_z: torch.Tensor
    """(B,) bool: the row's log-Z gradient reaches the table (the fresh rows)."""
    rewards: torch.Tensor
    """(B,) float rewards in [0, 1]."""
    advantages: torch.Tensor
    """(B,) GRPO advantages (group-normalized rewards; a replayed row: 0)."""
    old_log_probs: torch.Tensor
    """(B, T) token log-probs of the anchor pi_old (the generator's until recomputed)."""
    ref_log_probs: torch.Tensor | None = None
    """(B, T) token log-probs of the KL reference (FlowRL, GRPO with a KL term), else None."""
    log_z: torch.Tensor | None = None
    """(B,) log Z of each row's prompt, with gradients on, set by the optimization stage (or
    by FlowRL's head per micro-batch)."""


def build_train_batch(prompt_rows: torch.Tensor, fresh: RolloutBatch, rewards: torch.Tensor,
                      replayed: list[ReplaySample], *,
                      replay_updates_log_z: bool = False) -> RLBatch:
    """Fresh rows ((P,) log-Z rows, their (P*G)-row :class:`RolloutBatch` and (P, G) rewards)
    + the replayed samples, as one :class:`RLBatch` (``replay_updates_log_z``:
    --replay-updates-log-z, replayed rows move the table too)."""
    num_groups, group_size = rewards.shape
    num_fresh = fresh.num_sequences
    if num_fresh != num_groups * group_size or prompt_rows.numel() != num_groups:
        raise ValueError(f"{num_fresh} fresh rows for {prompt_rows.numel()} prompts and "
                         f"{tuple(rewards.shape)} rewards")
    tokens = torch.cat([fresh.tokens, *(s.tokens[None] for s in replayed)])
    mask = torch.cat([fresh.completion_mask, *(s.completion_mask[None] for s in replayed)])
    old_log_probs = torch.cat([fresh.rollout_log_probs,
                               *(s.old_log_probs[None] for s in replayed)])
    rows = torch.cat([prompt_rows.repeat_interleave(group_size),
                      torch.tensor([s.row for s in replayed], dtype=torch.long)])
    all_rewards = torch.cat([rewards.flatten().float(),
                             torch.tensor([s.reward for s in replayed], dtype=torch.float32)])
    groups = torch.cat([torch.arange(num_fresh) // group_size,  # a replayed row: own group
                        -1 - torch.arange(len(replayed))])
    return RLBatch(tokens, mask, log_z_rows=rows,
                   updates_log_z=(torch.arange(len(rows)) < num_fresh) | replay_updates_log_z,
                   rewards=all_rewards,
                   advantages=group_normalized_advantages(all_rewards, groups),
                   old_log_probs=old_log_probs)


def split_for_steps(batch: RLBatch, num_steps: int, *, num_fresh: int,
                    group_size: int) -> list[RLBatch]:
    """``batch`` as ``num_steps`` mini-batches, one optimizer step each
    (--num-steps-per-rollout): mini-batch k holds this rank's fresh groups whose index is k
    modulo ``num_steps`` (whole groups) and its replayed rows whose index is k modulo
    ``num_steps``. When every DP rank holds the same number of groups and of replayed rows,
    each a multiple of ``num_steps``, mini-batch k over all ranks is the same set of rows on
    any layout."""
    if num_steps == 1:
        return [batch]
    num_groups, num_replayed = num_fresh // group_size, batch.num_sequences - num_fresh
    if num_groups % num_steps:
        raise ValueError(f"{num_groups} groups on this rank do not divide into "
                         f"--num-steps-per-rollout {num_steps} mini-batches")
    minis = []
    for k in range(num_steps):
        rows = [g * group_size + j for g in range(k, num_groups, num_steps)
                for j in range(group_size)]
        rows += [num_fresh + i for i in range(k, num_replayed, num_steps)]
        minis.append(batch.select(torch.tensor(rows, dtype=torch.long)))
    return minis

