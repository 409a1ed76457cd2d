"""log Z as a function of the prompt: the learned head, alone or with the table beside it.

``--log-z-param`` picks what ``log_z[x]`` is (all on the 1/beta scale; ``f(x)`` is the
prompt's feature, :mod:`megatron_paced.paced.features`; ``T`` the per-prompt table of
:mod:`megatron_paced.paced.log_z`)::

    table    log_z[x] = T[x]
    head     log_z[x] = head(f(x))                          (the paper's form)
    hybrid   log_z[x] = head(f(x)) + R[x],
             R[x] = n / (n + k) (T[x] - head_at_last_visit(f(x)))

(n the prompt's visits, k = ``--log-z-residual-prior``), so right after its prompt is trained
on a hybrid row reads the table (k = 0) or the table shrunk toward the head, as a posterior
mean with the head as a prior worth k visits (a group's estimate is noisy), and then follows
the head's moves (what it learns from other prompts, e.g. that the policy got better); a prompt
never trained on (R = 0) reads the head.

Training (collective over DP, once per RL step, on the step's fresh prompts): each owner
averages its rows' gradients per prompt, ``g_x`` (the mean of ``d loss / d log_z = 2 delta``
over the prompt's samples), so ``log_z[x] - g_x / 2`` is this visit's TB optimum; the table
takes its own step (``--log-z-optimizer``) toward it, whatever log Z the loss read. The head
then regresses on the table: ``--log-z-head-fit-steps`` Adam steps on
``mean_x (head(f(x)) - T[x])^2`` over every prompt trained on in the last
``--log-z-head-window`` steps (about ``--log-z-head-fit-rows`` of them per Adam step, a
hashed subsample the same on any DP layout; all DP ranks: an all-reduce of the parameter
gradients), i.e.
the TB gradient's per-prompt fixed points, kept by the table, drive the head (one Adam step
per RL step on that step's prompts alone fits too slowly and lets the head's error bias the
policy's loss: docs/results.md).

Prompts outside the table (a held-out set with features of their own, ``heldout_features``)
are estimated by the head alone: the calibration probe measures how well it generalizes.

Usage::

    log_z = LearnedLogZ(num_prompts, param="hybrid", feature_dim=64, beta=0.05,
                        init_acc=0.5, lr=0.05, dp_group=ctx.dp_group)
    log_z.set_features(local_features)                 # (row_end - row_start, 64) float32
    values = log_z.lookup(rows)                         # as the table's
    log_z.apply_gradients(rows, grads)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_paced.paced.head import LogZHead
from megatron_paced.paced.log_z import LogZConfig, ShardedLogZ
from megatron_paced.paced.sharded_rows import block_data

CHUNK = 1 << 16  # rows per head evaluation, to bound memory over large blocks


def row_uniforms(rows: torch.Tensor, salt: int) -> torch.Tensor:
    """A fixed pseudo-uniform in [0, 1) per (global row, salt): multiplicative hashing, no
    state, the same whichever rank holds the row (rows < 2**32)."""
    mixed = (rows.to(torch.int64) * 2654435761 + (salt % 2**20) * 97531 + 12345) % 2**31
    for multiplier in (2246822519, 3266489917, 668265263):  # xorshift-multiply rounds
        mixed = ((mixed ^ (mixed >> 15)) * multiplier + salt % 65521) % 2**31
    return mixed.double() / 2**31


class LearnedLogZ(ShardedLogZ):
    """The head (replicated) plus this DP rank's block of the table, anchors and features."""

    scores_change_every_step = True

    @property
    def needs_features(self) -> bool:
        """Whether its prompt features are still to be set (none came with a checkpoint)."""
        return self.features is None
    """Every row's estimate moves when the head trains: selection scores a candidate pool."""

    def __init__(self, num_prompts: int, *, param: str, feature_dim: int, beta: float,
                 init_acc: float, lr: float, width: int = 128, num_layers: int = 3,
                 head_lr: float = 1e-3, fit_steps: int = 8, window: int = 32,
                 fit_rows: int = 4096, residual_prior: float = 4.0, seed: int = 0,
                 **table_kwargs) -> None:
        if param not in ("head", "hybrid"):
            raise ValueError(f"--log-z-param {param!r}: head or hybrid (table is ShardedLogZ)")
        super().__init__(num_prompts, beta=beta, init_acc=init_acc, lr=lr, **table_kwargs)
        self.anchor = self.values.clone()  # the fresh head's constant, init_acc / beta
        self.last_update = torch.full_like(self.visits, -1)
        self.num_updates = 0
        self.fit_steps, self.window, self.fit_rows = int(fit_steps), int(window), int(fit_rows)
        self.residual_prior = float(residual_prior)
        self.param = param
        self.feature_dim = int(feature_dim)
        self.head = LogZHead(feature_dim, width=width, num_layers=num_layers, beta=beta,
                             init_acc=init_acc, lr=head_lr, seed=seed)
        self.features: torch.Tensor | None = None
        self.heldout_features: torch.Tensor | None = None

    # ---- features --------------------------------------------------------------------------
    def set_features(self, local: torch.Tensor, heldout: torch.Tensor | None = None) -> None:
        """This rank's block of features, (row_end - row_start, feature_dim), and optionally
        those of held-out prompts (replicated)."""
        expected = (self.row_end - self.row_start, self.feature_dim)
        if tuple(local.shape) != expected:
            raise ValueError(f"log-Z features of shape {tuple(local.shape)}; rows "
                             f"{self.row_start}..{self.row_end} need {expected}")
        self.features = local.float().contiguous()
        if heldout is not None:
            self.heldout_features = heldout.float().contiguous()

    def _features_of(self, rows: torch.Tensor | None) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("the log-Z head has no prompt features yet (set_features)")
        return self.features if rows is None else self.features[rows]

    def _head_of(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.head(features[i:i + CHUNK])
                              for i in range(0, len(features), CHUNK)]
                             or [torch.zeros(0, dtype=torch.float64)])

    # ---- the table's interface ----------------------------------------------------------
    def local_log_z(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        head = self._head_of(self._features_of(rows))
        if self.param == "head":
            return head
        if rows is None:
            return head + self.values - self.anchor
        return head + self.values[rows] - self.anchor[rows]

    def _step_rows(self, touched: torch.Tensor, mean_grad: torch.Tensor) -> None:
        target = self.local_log_z(touched) - mean_grad / 2  # this visit's TB optimum
        super()._step_rows(touched, 2 * (self.values[touched] - target))
        self.last_update[touched] = self.num_updates
        self._fit_head()
        # anchor = head + (1 - w)(T - head), so head + T - anchor = head + w (T - head)
        head = self._head_of(self._features_of(touched))
        visits = self.visits[touched].double()
        weight = visits / (visits + self.residual_prior)
        self.anchor[touched] = head + (1 - weight) * (self.values[touched] - head)
        self.num_updates += 1

    def recent_rows(self) -> torch.Tensor:
        """Local indices of the rows trained in the last ``window`` updates."""
        return torch.nonzero((self.last_update >= 0)
                             & (self.last_update > self.num_updates - self.window)).flatten()

    def _fit_head(self) -> None:
        """The head regresses on the table over the rows trained in the last window
        (collective over DP; a rank may have none). Each fit step takes about
        ``fit_rows`` of them, chosen by a hash of (row, update, fit step): the same rows on
        any DP layout."""
        recent = self.recent_rows()
        count = torch.tensor([float(len(recent))], dtype=torch.float64)
        if self.dp_group is not None and self.dp_size > 1:
            dist.all_reduce(count, group=self.dp_group)
        keep = min(1.0, self.fit_rows / max(float(count), 1.0))
        rows = recent + self.row_start
        for step in range(self.fit_steps):
            mine = recent if keep == 1.0 else recent[
                row_uniforms(rows, self.num_updates * 1024 + step) < keep]
            features, targets = self._features_of(mine), self.values[mine]
            self.head.step(features, 2 * (self._head_of(features) - targets),
                           dp_group=self.dp_group)

    def heldout_acc_est(self, index: torch.Tensor) -> torch.Tensor:
        """beta * head(f) of held-out prompts (their features set by :meth:`set_features`)."""
        if self.heldout_features is None:
            raise RuntimeError("no held-out features were set")
        return self.beta * self._head_of(self.heldout_features[index])

    # ---- checkpointing -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(), "anchor": self.anchor,
                "last_update": self.last_update}

    def sharded_state_dict(self, prefix: str = "log_z.", replica_id=(0,),
                           names: tuple[str, ...] | None = None) -> dict:
        """The table's tensors with the anchors and last updates, the features as a sharded
        (num_prompts, feature_dim) tensor, and the head with its Adam state (common)."""
        out = super().sharded_state_dict(prefix, replica_id, names)
        if names is not None:  # a table's tensors only (loading a table checkpoint)
            return out
        features = self.features if self.features is not None else torch.zeros(
            self.row_end - self.row_start, self.feature_dim)  # a template to load into
        out.update(self.shard.sharded_state_dict({"features": features}, prefix=prefix,
                                                 replica_id=replica_id))
        out["head"] = {"model": self.head.state_dict(),
                       "optimizer": self.head.optimizer.state_dict(),
                       "num_updates": self.num_updates}
        if self.heldout_features is not None:
            out["heldout_features"] = self.heldout_features
        return out

    def load_state_dict(self, state: dict, saved_param: str | None = None) -> None:
        """Take a loaded :meth:`sharded_state_dict`. From a checkpoint of ``--log-z-param
        table`` (no features, no head) the table is kept, the head starts fresh
        (a hybrid then reads the same log Z as the table did), and the features are left unset
        (computed again from the policy)."""
        super().load_state_dict(state)
        if (saved_param or self.param) == "table":
            self.anchor.fill_(self.init_acc / self.beta)
            self.last_update.fill_(-1)
            return
        self.set_features(block_data(state["features"]).reshape(-1, self.feature_dim),
                          state.get("heldout_features"))
        self.head.load_state_dict(state["head"]["model"])
        self.head.optimizer.load_state_dict(state["head"]["optimizer"])
        self.num_updates = int(state["head"]["num_updates"])


def build_log_z_table(num_prompts: int, cfg: LogZConfig, *, beta: float, target_acc: float,
                      dp_group: dist.ProcessGroup | None = None, hidden_size: int = 0,
                      seed: int = 0) -> ShardedLogZ:
    """log Z from its flags: the table, or with ``--log-z-param head|hybrid`` a
    :class:`LearnedLogZ` (its features are set later,
    from the base policy). ``--log-z-init-acc`` defaults to ``--target-acc`` (tau)."""
    cfg.validate()
    init_acc = target_acc if cfg.log_z_init_acc is None else cfg.log_z_init_acc
    kwargs = dict(beta=beta, init_acc=init_acc, lr=cfg.log_z_lr, optimizer=cfg.log_z_optimizer,
                  dp_group=dp_group, min_step=cfg.log_z_min_step)
    if cfg.log_z_param == "table":
        return ShardedLogZ(num_prompts, **kwargs)
    return LearnedLogZ(num_prompts, param=cfg.log_z_param,
                       feature_dim=cfg.log_z_feature_dim or hidden_size,
                       width=cfg.log_z_head_width, num_layers=cfg.log_z_head_layers,
                       head_lr=cfg.log_z_head_lr, fit_steps=cfg.log_z_head_fit_steps,
                       window=cfg.log_z_head_window, fit_rows=cfg.log_z_head_fit_rows,
                       residual_prior=cfg.log_z_residual_prior,
                       seed=seed, **kwargs)
