"""The per-prompt log-partition table log_z, sharded over data-parallel ranks by row.

One float per prompt, at its row (the dataset index ``0 <= row < num_prompts``, not the
dataset's stable ``prompt_id``), on a 1/beta scale:
``acc_est(x) = beta * log_z[x]`` estimates the online accuracy of x (Proposition 4.1).
Unvisited rows start at ``init_acc / beta`` (init_acc defaults to the selection target tau,
so new prompts look maximally informative and are tried first).

Partition: rows are split in contiguous blocks, ``rows_per_rank = ceil(num_prompts /
dp_size)``, ``owner(row) = row // rows_per_rank``. Every replica of a DP rank (its TP and PP
peers) holds the same shard and applies the same updates. A sample of prompt x may be
trained on any DP rank:

    lookup(rows)             rows go to their owners, values come back     (two all-to-alls)
    apply_gradients(rows, g) (row, grad) pairs go to their owners          (two all-to-alls)

The table has its own optimizer, outside the model's DDP buckets. Gradients are normalized
*per prompt*: a row's gradient is the mean over that step's samples of the prompt of
``d delta^2 / d log_z = 2 delta``, so the learning rate does not depend on the batch size or
the number of samples per prompt. With SGD and lr 0.5 a row jumps to the step's optimum;
lr 0.05 is an exponential average over about ten visits. Adam keeps per-row moments and a
per-row step count (rows are updated only when their prompt is drawn). ``running-mean``
moves a row max(1/k, min_step) of the way to its k-th visit's optimum: the exact mean of the
first visits (the first jumps from the prior), then an exponential average that keeps
forgetting as the policy improves.

Every rank validates its inputs and the ranks agree (an all-reduce of a flag) before any
row is written, so a bad row or a non-finite gradient raises on every rank and leaves
the table untouched.

Usage::

    table = ShardedLogZ(num_prompts=7473, beta=0.05, init_acc=0.5, lr=0.1,
                        dp_group=ctx.dp_group)
    log_z = table.lookup(batch_rows).requires_grad_()     # (B,), into the loss
    ... backward ...
    table.apply_gradients(batch_rows, log_z.grad)
    acc_est = table.acc_est(batch_rows)                          # beta * log_z, (B,)
    acc_est = table.gather_acc_est()                            # (num_prompts,), every rank
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from megatron_paced.config import require
from megatron_paced.paced.sharded_rows import ShardedRows, UpdatedRows, agree, load_blocks


@dataclass
class LogZConfig:
    """The log-partition table and its optimizer."""

    log_z_lr: float = 0.05
    """Learning rate of the sgd and adam steps (on a row's per-prompt mean gradient)."""
    log_z_optimizer: Literal["sgd", "adam", "running-mean"] = "running-mean"
    """Optimizer of the log-Z rows: sgd, adam (per-row moments and step counts), or
    running-mean (a row's k-th visit moves it max(1/k, --log-z-min-step) of the way to that
    visit's optimum: the mean of its visits, then an exponential average; --log-z-lr unused)."""
    log_z_min_step: float = 0.2
    """running-mean: the smallest step, so that a row keeps forgetting as the policy moves."""
    log_z_init_acc: Optional[float] = None
    """Accuracy estimate of an unvisited prompt (log_z = init / beta); default: --target-acc."""
    log_z_param: Literal["table", "head", "hybrid"] = "table"
    """What log Z is: table (a free number per prompt), head (an MLP over prompt features,
    the paper's form: it also estimates prompts never drawn) or hybrid (head + a per-prompt
    residual table starting at 0). See docs/results.md for the measurements."""
    log_z_head_width: int = 128
    """head, hybrid: hidden width of the MLP."""
    log_z_head_layers: int = 3
    """head, hybrid: linear layers of the MLP (the paper: 3)."""
    log_z_head_lr: float = 1e-3
    """head, hybrid: Adam learning rate of the MLP (its output is on the accuracy scale)."""
    log_z_head_fit_steps: int = 8
    """head, hybrid: Adam steps per RL step of the head's regression on the table."""
    log_z_head_window: int = 32
    """head, hybrid: the head regresses on the prompts trained in this many last steps."""
    log_z_head_fit_rows: int = 4096
    """head, hybrid: about this many of those prompts per Adam step (a hashed subsample)."""
    log_z_residual_prior: float = 4.0
    """hybrid: the head's weight as a prior, in visits (k): right after its n-th visit a row
    reads head + n / (n + k) (T - head), the table shrunk toward the head (0: the table;
    4 measured best of 0, 2, 4 on the benchmark task: docs/results.md)."""
    log_z_feature_pooling: Literal["mean", "last"] = "mean"
    """head, hybrid: a prompt's feature is the mean (or the last token's) final hidden state of
    the base policy over the prompt tokens."""
    log_z_feature_dim: int = 64
    """head, hybrid: features are projected to this width by a fixed random matrix (0: the
    model's hidden size); 4 bytes per prompt each, sharded over DP like the table."""
    log_z_feature_cache: Optional[str] = None
    """head, hybrid: a directory where features are kept, keyed by base model, prompts and
    feature settings, so that runs from the same base policy compute them once."""

    def validate(self) -> None:
        require(math.isfinite(self.log_z_lr) and self.log_z_lr > 0, "log_z_lr", self.log_z_lr,
                "must be a finite number > 0")
        require(0.0 < self.log_z_min_step <= 1.0, "log_z_min_step", self.log_z_min_step,
                "must be in (0, 1]")
        require(self.log_z_head_width >= 1, "log_z_head_width", self.log_z_head_width,
                "must be >= 1")
        require(self.log_z_head_layers >= 1, "log_z_head_layers", self.log_z_head_layers,
                "must be >= 1")
        require(math.isfinite(self.log_z_head_lr) and self.log_z_head_lr > 0, "log_z_head_lr",
                self.log_z_head_lr, "must be a finite number > 0")
        require(self.log_z_head_fit_steps >= 1, "log_z_head_fit_steps",
                self.log_z_head_fit_steps, "must be >= 1")
        require(self.log_z_head_fit_rows >= 1, "log_z_head_fit_rows",
                self.log_z_head_fit_rows, "must be >= 1")
        require(math.isfinite(self.log_z_residual_prior) and self.log_z_residual_prior >= 0,
                "log_z_residual_prior", self.log_z_residual_prior, "must be a finite number >= 0")
        require(self.log_z_head_window >= 1, "log_z_head_window", self.log_z_head_window,
                "must be >= 1")
        require(self.log_z_feature_dim >= 0, "log_z_feature_dim", self.log_z_feature_dim,
                "must be >= 0 (0: the hidden size)")
        if self.log_z_init_acc is not None:
            require(0.0 <= self.log_z_init_acc <= 1.0, "log_z_init_acc", self.log_z_init_acc,
                    "must be in [0, 1]")


def per_prompt_mean(rows: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    """(B,) rows and (B,) per-sample gradients -> the distinct rows and each one's mean."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, grads.double())
    return unique, sums / torch.bincount(inverse, minlength=len(unique))


class ShardedLogZ:
    """This DP rank's block of the log-Z table, with its optimizer state; an
    :class:`~megatron_paced.paced.estimator.AccuracyEstimator` (``beta * log_z``)."""

    name = "log-z"
    scores_change_every_step = False
    param = "table"
    needs_features = False

    def __init__(self, num_prompts: int, *, beta: float, init_acc: float, lr: float,
                 optimizer: str = "sgd", dp_group: dist.ProcessGroup | None = None,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 min_step: float = 0.2) -> None:
        require(num_prompts >= 1, "num_prompts", num_prompts, "the table needs >= 1 prompt")
        require(math.isfinite(beta) and beta > 0, "beta", beta, "must be a finite number > 0")
        require(optimizer in ("sgd", "adam", "running-mean"), "log_z_optimizer", optimizer,
                "sgd, adam or running-mean")
        self.num_prompts = num_prompts
        self.beta = float(beta)
        self.init_acc = float(init_acc)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.adam_betas = adam_betas
        self.adam_eps = adam_eps
        self.min_step = float(min_step)
        self.dp_group = dp_group
        self.shard = ShardedRows(num_prompts, dp_group)
        self.dp_size, self.dp_rank = self.shard.dp_size, self.shard.dp_rank
        self.row_start, self.row_end = self.shard.row_start, self.shard.row_end
        n = self.shard.num_local
        self.values = torch.full((n,), self.init_acc / self.beta, dtype=torch.float64)
        self.visits = torch.zeros(n, dtype=torch.int64)
        self.exp_avg = torch.zeros(n, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(n, dtype=torch.float64)
        self.updated = UpdatedRows()

    def take_updated_rows(self) -> torch.Tensor | None:
        """Local rows written since the last call (None: all of them, e.g. after a load)."""
        return self.updated.take()

    # ---- lookup and update -----------------------------------------------------------------
    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """log_z of each requested prompt, (n,) int64 rows -> (n,) float32, from the owners."""
        return self.shard.lookup(rows, self.local_log_z).float()

    def apply_gradients(self, rows: torch.Tensor, grads: torch.Tensor) -> int:
        """One optimizer step on the rows of the given samples; returns rows updated here.

        ``grads[i]`` is ``d loss / d log_z`` of sample i (2 delta_i for the TB losses); a row
        moves by its prompt's mean gradient. Raises on every rank, writing nothing, if any
        row is outside the table or any gradient is not finite.
        """
        rows = rows.to(torch.int64).cpu()
        grads = grads.detach().to(torch.float64).cpu()
        if grads.shape != rows.shape:
            raise ValueError(f"{grads.shape[0]} gradients for {rows.shape[0]} rows")
        self.shard.check(rows)
        finite = bool(torch.isfinite(grads).all())
        if not agree(self.dp_group, finite):
            raise FloatingPointError("non-finite log-Z gradient (a NaN reward or loss?): the "
                                     "step is aborted and the log-Z table is unchanged")
        route = self.shard.route(rows)
        recv_grads = self.shard.to_owners(route, grads)
        # Work on the distinct rows received: O(batch), whatever the table size.
        touched, mean_grad = per_prompt_mean(route.recv_rows - self.row_start, recv_grads)
        self.updated.mark(touched)
        self.visits[touched] += 1
        self._step_rows(touched, mean_grad)
        return len(touched)

    def _step_rows(self, touched: torch.Tensor, mean_grad: torch.Tensor) -> None:
        """The optimizer step of the local rows ``touched`` (visits already counted)."""
        if self.optimizer == "sgd":
            self.values[touched] -= self.lr * mean_grad
            return
        if self.optimizer == "running-mean":  # mean_grad / 2 = log_z - this visit's optimum
            fraction = (1.0 / self.visits[touched].double()).clamp(min=self.min_step)
            self.values[touched] -= fraction * mean_grad / 2
            return
        beta1, beta2 = self.adam_betas
        steps = self.visits[touched].double()
        self.exp_avg[touched] = beta1 * self.exp_avg[touched] + (1 - beta1) * mean_grad
        self.exp_avg_sq[touched] = beta2 * self.exp_avg_sq[touched] + (1 - beta2) * mean_grad ** 2
        m_hat = self.exp_avg[touched] / (1 - beta1 ** steps)
        v_hat = self.exp_avg_sq[touched] / (1 - beta2 ** steps)
        self.values[touched] -= self.lr * m_hat / (v_hat.sqrt() + self.adam_eps)

    def observe(self, rows: torch.Tensor, rewards: torch.Tensor) -> None:
        """Rewards seen by the step's groups: log Z learns through the loss instead (an
        estimator that learns from rewards, the Beta posterior, overrides this)."""

    # ---- estimates -----------------------------------------------------------------------
    def local_log_z(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """log_z of this rank's rows (all, or the given local row indices), float64."""
        return self.values if rows is None else self.values[rows]

    def acc_est(self, rows: torch.Tensor) -> torch.Tensor:
        """beta * log_z of the given rows, from their owners (collective): (n,) -> float64."""
        return self.lookup(rows).double() * self.beta

    def local_acc_est(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """beta * log_z of this rank's rows (all, or the given local row indices), float64."""
        return self.beta * self.local_log_z(rows)

    def owned_acc_est(self, rows: torch.Tensor) -> torch.Tensor:
        """beta * log_z of global rows this rank owns (no collective), float64."""
        return self.local_acc_est(rows - self.row_start)

    def heldout_acc_est(self, index: torch.Tensor) -> torch.Tensor:
        """The estimate of prompts outside the table (held out): init_acc, float64."""
        return torch.full((len(index),), self.init_acc, dtype=torch.float64)

    def gather_acc_est(self) -> torch.Tensor:
        """beta * log_z of every prompt on every rank: (num_prompts,) float64, one all-reduce.

        For small tables; selection over large tables uses local candidates instead.
        """
        return self.shard.gather(self.local_acc_est())

    def gather_visits(self) -> torch.Tensor:
        """How many steps updated each row, every prompt on every rank: (num_prompts,)."""
        return self.shard.gather(self.visits.double()).long()

    # ---- checkpointing ---------------------------------------------------------------------
    TABLE_STATE = ("values", "visits", "exp_avg", "exp_avg_sq")
    """What a plain table's checkpoint holds (a learned log Z adds its own)."""

    def sharded_state_dict(self, prefix: str = "log_z.", replica_id=(0,),
                           names: tuple[str, ...] | None = None) -> dict:
        """Megatron sharded state dict: each tensor as this rank's block (offset row_start)
        of the global (num_prompts,) tensor, so a checkpoint loads on any DP size.
        ``replica_id`` must be all zeros on exactly one replica of each DP rank (e.g.
        (tp_rank, pp_rank)). The last block may be shorter than the others, so the tensors
        carry no ``axis_fragmentations`` (which would demand equal blocks). ``names``: the
        tensors to include (default: all of this class's)."""
        state = self.state_tensors()
        return self.shard.sharded_state_dict(
            {name: state[name] for name in names or state}, prefix=prefix, replica_id=replica_id)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The per-row tensors a checkpoint holds, by name."""
        return {name: getattr(self, name) for name in self.TABLE_STATE}

    def load_state_dict(self, state: dict) -> None:
        """Take the tensors of a loaded :meth:`sharded_state_dict` (those it holds)."""
        load_blocks(self.state_tensors(), state)
        self.updated.mark_all()
