"""log Z as a function of the prompt: the learned head, alone or with the table as residual.

``--log-z-param`` picks what ``log_z[x]`` is (all on the 1/beta scale; ``f(x)`` is the
prompt's feature, :mod:`megatron_paced.paced.features`)::

    table    log_z[x] = T[x]                        (megatron_paced.paced.log_z)
    head     log_z[x] = head(f(x))                  (the paper's form)
    hybrid   log_z[x] = head(f(x)) + R[x]           (R: a per-prompt residual, starting at 0)

:class:`LearnedLogZ` keeps the table's interface (``lookup``, ``apply_gradients``,
``acc_est``, ...) and its partition: rank r holds the rows ``[row_start, row_end)`` of the
residual, the visit counts and the features, and answers for them, so the routing
(two all-to-alls each way) is the table's. The head is replicated on every rank.

A gradient step on the step's rows (collective over DP): each owner averages its rows'
gradients per prompt (``g_x``, the mean of ``2 delta`` over the prompt's fresh samples), then

* the head takes one Adam step on ``sum_x g_x head(f(x)) / num_prompts`` (all prompts of all
  DP ranks: an all-reduce of the parameter gradients);
* hybrid: ``R`` takes the table's own step (``--log-z-optimizer``) and then absorbs the head's
  move on the rows it trained, ``R[x] -= head_new(f(x)) - head_old(f(x))``, so that a trained
  row's log Z moves exactly as the table's would; between visits it follows the head.

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

from megatron_paced.paced.head import LogZHead
from megatron_paced.paced.log_z import ShardedLogZ

PARAMS = ("table", "head", "hybrid")
CHUNK = 1 << 16  # rows per head evaluation, to bound memory over large blocks


class LearnedLogZ(ShardedLogZ):
    """The head (replicated) plus this DP rank's block of residuals, visits and features."""

    scores_change_every_step = True
    """Every row's estimate moves when the head trains: selection scores a candidate pool."""

    def __init__(self, num_prompts: int, *, param: str, feature_dim: int, beta: float,
                 init_acc: float, lr: float, width: int = 128, num_layers: int = 3,
                 head_lr: float = 1e-3, seed: int = 0, **table_kwargs) -> None:
        if param not in ("head", "hybrid"):
            raise ValueError(f"--log-z-param {param!r}: head or hybrid (table is ShardedLogZ)")
        super().__init__(num_prompts, beta=beta, init_acc=init_acc, lr=lr, **table_kwargs)
        self.values.zero_()  # the residual
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
        return head + (self.values if rows is None else self.values[rows])

    def _step_rows(self, touched: torch.Tensor, mean_grad: torch.Tensor) -> None:
        features = self._features_of(touched)
        head_before = self._head_of(features)
        self.head.step(features, mean_grad, dp_group=self.dp_group)  # collective
        if self.param == "hybrid":
            super()._step_rows(touched, mean_grad)
            self.values[touched] -= self._head_of(features) - head_before

    def heldout_acc_est(self, index: torch.Tensor) -> torch.Tensor:
        """beta * head(f) of held-out prompts (their features set by :meth:`set_features`)."""
        if self.heldout_features is None:
            raise RuntimeError("no held-out features were set")
        return self.beta * self._head_of(self.heldout_features[index])

    # ---- checkpointing -------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "log_z.", replica_id=(0,)) -> dict:
        """The table's tensors (the residual in ``values``), the features as a sharded
        (num_prompts, feature_dim) tensor, and the head with its Adam state (common)."""
        from megatron.core.dist_checkpointing import ShardedTensor

        out = super().sharded_state_dict(prefix, replica_id)
        features = self.features if self.features is not None else torch.zeros(
            self.row_end - self.row_start, self.feature_dim)  # a template to load into
        out["features"] = ShardedTensor(
            key=f"{prefix}features", data=features, dtype=features.dtype,
            local_shape=tuple(features.shape), global_shape=(self.num_prompts, self.feature_dim),
            global_offset=(self.row_start, 0), axis_fragmentations=None, replica_id=replica_id)
        out["head"] = {"model": self.head.state_dict(),
                       "optimizer": self.head.optimizer.state_dict()}
        if self.heldout_features is not None:
            out["heldout_features"] = self.heldout_features
        return out

    def load_state_dict(self, state: dict, saved_param: str | None = None) -> None:
        """Take a loaded :meth:`sharded_state_dict`. From a checkpoint of ``--log-z-param
        table`` (older ones: no features, no head) the head starts fresh, the hybrid's residual
        is the saved table minus the fresh head (the same log Z), and the features are left
        unset (computed again from the policy)."""
        saved_param = saved_param or self.param
        super().load_state_dict(state)
        if saved_param == "table":
            self.values -= self.init_acc / self.beta  # the fresh head's constant
            if self.param == "head":
                self.values.zero_()
            return
        features = state["features"]
        features = features.data if not isinstance(features, torch.Tensor) else features
        self.set_features(features.reshape(-1, self.feature_dim),
                          state.get("heldout_features"))
        self.head.load_state_dict(state["head"]["model"])
        self.head.optimizer.load_state_dict(state["head"]["optimizer"])
        if self.param == "head":
            self.values.zero_()
