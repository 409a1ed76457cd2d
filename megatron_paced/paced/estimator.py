"""What an accuracy estimator is: the interface prompt selection, the replay priority, the
logged ``acc_est`` and the calibration probe read (``--acc-estimator``).

Implemented by the log-Z table (:class:`~megatron_paced.paced.log_z.ShardedLogZ`,
``beta * log_z``), the learned log Z (:class:`~megatron_paced.paced.learned_log_z.LearnedLogZ`),
MoPPS's Beta posterior (:class:`~megatron_paced.paced.estimators.BetaPosteriorTable`) and the
oracle (:class:`~megatron_paced.paced.estimators.OracleAccuracy`). Callers read the declared
attributes, never the class: ``name`` is what checkpoints record, ``scores_change_every_step``
tells selection to score candidates afresh each step instead of reading a gathered table.
A per-prompt estimator shards its rows over DP with
:class:`~megatron_paced.paced.sharded_rows.ShardedRows` (routing, gather, checkpoint blocks);
one that does not change every step also offers selection's incremental reads
(``local_acc_est``, ``take_updated_rows``, ``row_start``/``row_end``, ``gather_acc_est``).

Usage::

    estimator: AccuracyEstimator = build_estimator(...)
    acc = estimator.acc_est(rows)            # (P,) estimated accuracies, collective
    estimator.observe(rows, rewards)         # (P,) rows, (P, G) rewards of this rank's groups
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AccuracyEstimator(Protocol):
    name: str
    """log-z, beta-posterior or oracle: the --acc-estimator it implements."""
    scores_change_every_step: bool
    """True when every estimate may move each step (a learned head, the oracle)."""
    num_prompts: int
    """Rows it estimates (the training prompts)."""

    def acc_est(self, rows: torch.Tensor) -> torch.Tensor:
        """(P,) estimated accuracies of ``rows`` (global rows; collective over DP)."""

    def observe(self, rows: torch.Tensor, rewards: torch.Tensor) -> None:
        """Learn from this rank's scored groups ((P,) rows, (P, G) rewards); a no-op for
        estimators that learn through the loss (log Z) or not at all (the oracle)."""

    def gather_visits(self) -> torch.Tensor:
        """(num_prompts,) groups observed per row (collective)."""

    def heldout_acc_est(self, index: torch.Tensor) -> torch.Tensor:
        """Estimates of held-out prompts (outside the table), by their index (the probe)."""

    def sharded_state_dict(self, prefix: str, replica_id=(0,)) -> dict:
        """What a checkpoint holds of it (Megatron sharded state dict; {} for nothing)."""

    def load_state_dict(self, state: dict) -> None:
        """Take back a loaded :meth:`sharded_state_dict`."""
