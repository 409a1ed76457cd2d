"""Adaptive prompt selection: pick the prompts whose estimated accuracy is nearest tau.

Every prompt has a *key*; a step selects the ``num`` prompts with the highest keys. All
randomness comes from generators seeded by ``(seed, step, stream, block of 4,096 prompt
ids)``, so the selection depends only on the table's values, the seed and the step: the same
on every rank, on any DP layout, and after a resume.

    a(x)          = clip(beta * log_z[x], 0, 1)                  accuracy estimate
    paced-greedy  key = -|a(x) - tau| - 1e-12 * u_x              (the paper's rule; u_x is a
                  fixed per-prompt uniform, so ties -- e.g. the unvisited prompts, all at
                  a = tau -- are tried in a random order)
    paced-soft    key = -|a(x) - tau| / T + Gumbel(u_{x,step})   (Gumbel-top-k: sampling
                  without replacement with weights exp(-|a - tau| / T))
    uniform       num prompts drawn uniformly without replacement

With ``--selection-epsilon e`` a Binomial(num, e) share of the slots is first filled
uniformly, the rest by the paced rule among the other prompts. Uniform draws cost O(num).

Distributed (the table is sharded by row over DP):

* tables up to ``--selection-gather-max`` prompts: one all-reduce assembles the estimates
  and every rank runs :func:`select_prompts` on the full vector;
* larger tables: each rank proposes its local top-``num`` candidates and an all-gather of
  O(num x dp) (key, id) pairs picks the exact global set (a global top-k is always inside
  the union of the local top-k's). For greedy, each rank keeps a pool of its best rows and a
  threshold that no row outside the pool exceeds; a step only re-keys the rows the log-Z
  update touched, and rebuilds the pool (one pass over the local rows) when fewer than
  ``num`` pool rows remain above the threshold -- exact, O(batch) per step amortized.
  paced-soft re-draws its noise every step and so makes one pass over the local rows.

A learned log Z (``--log-z-param head|hybrid``) moves every prompt's estimate at every step, so
no pool stays valid: each step draws ``--selection-candidates`` prompts uniformly from all of
them (visited or not; all prompts when there are fewer), the same on every rank, scores them
through the log-Z lookup (each owner evaluates the head on its candidates) and picks among
them by the paced rule; ties go to the earlier-drawn candidate. O(candidates) per step,
whatever the table size.

Usage::

    selector = PromptSelector(SelectionConfig(prompt_selection="paced-greedy"), seed=1,
                              dp_group=ctx.dp_group)
    rows = selector.select(log_z_table, num=64, step=step)   # log-Z rows, same on every rank
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from megatron_paced.config import require
from megatron_paced.utils import derive_seed

BLOCK = 1 << 12
TIE_STREAM, SOFT_STREAM, UNIFORM_STREAM, CANDIDATE_STREAM = 0, 1, 2, 3


def block_uniforms(start: int, end: int, *, seed: int, step: int, stream: int) -> torch.Tensor:
    """Uniforms in (0, 1) for prompt ids [start, end): float64, the same whatever the split."""
    if end <= start:
        return torch.zeros(0, dtype=torch.float64)
    parts = []
    for block in range(start // BLOCK, (end - 1) // BLOCK + 1):
        gen = torch.Generator().manual_seed(derive_seed(seed, step, stream, block))
        values = torch.rand(BLOCK, generator=gen, dtype=torch.float64)
        offset = block * BLOCK
        lo, hi = max(start, offset) - offset, min(end, offset + BLOCK) - offset
        parts.append(values[lo:hi])
    return torch.cat(parts).clamp_(min=1e-300)


@dataclass
class SelectionConfig:
    """Which prompts each step trains on."""

    prompt_selection: Literal["uniform", "paced-greedy", "paced-soft"] = "paced-greedy"
    """uniform, paced-greedy (nearest to --target-acc) or paced-soft (sampled with weights
    exp(-|acc - tau| / T)); paced-train's default is paced-greedy, and uniform for --algo grpo
    (which trains no log-Z table: a paced rule with it is refused)."""
    target_acc: float = 0.5
    """tau: the estimated accuracy the selection aims for, in (0, 1)."""
    selection_epsilon: float = 0.0
    """Share of each step's prompts drawn uniformly (exploration)."""
    selection_temperature: float = 0.1
    """T of paced-soft."""
    selection_gather_max: int = 100_000
    """Tables up to this many prompts all-reduce the estimates; larger ones exchange
    per-rank candidates (O(batch x dp))."""
    selection_candidates: int = 4096
    """--log-z-param head|hybrid, --acc-estimator oracle: prompts drawn uniformly and scored
    each step (all prompts when there are fewer)."""
    acc_estimator: Literal["log-z", "beta-posterior", "oracle"] = "log-z"
    """What selection, replay priorities and the probe read as a prompt's accuracy: log-z
    (beta * log_z, PACED-RL), beta-posterior (MoPPS: a per-prompt Beta posterior of the
    success rate from the rewards seen) or oracle (the policy's exact accuracy, arithmetic
    task: an upper bound); megatron_paced/paced/estimators.py."""
    beta_posterior_prior: float = 1.0
    """beta-posterior: the prior Beta(a0, a0)."""
    beta_posterior_decay: float = 1.0
    """beta-posterior: lambda, the weight kept by old evidence at each visit (1: none lost)."""

    def validate(self) -> None:
        require(0.0 < self.target_acc < 1.0, "target_acc", self.target_acc,
                "tau must be in (0, 1)")
        require(0.0 <= self.selection_epsilon <= 1.0, "selection_epsilon",
                self.selection_epsilon, "must be in [0, 1]")
        require(math.isfinite(self.selection_temperature) and self.selection_temperature > 0,
                "selection_temperature", self.selection_temperature, "must be > 0")
        require(self.selection_gather_max >= 0, "selection_gather_max",
                self.selection_gather_max, "must be >= 0")
        require(self.selection_candidates >= 1, "selection_candidates",
                self.selection_candidates, "must be >= 1")
        require(math.isfinite(self.beta_posterior_prior) and self.beta_posterior_prior > 0,
                "beta_posterior_prior", self.beta_posterior_prior, "must be a number > 0")
        require(0.0 <= self.beta_posterior_decay <= 1.0, "beta_posterior_decay",
                self.beta_posterior_decay, "must be in [0, 1]")


def num_uniform_slots(num: int, cfg: SelectionConfig, *, seed: int, step: int) -> int:
    """How many of ``num`` slots are uniform this step: all for uniform, else Binomial."""
    if cfg.prompt_selection == "uniform":
        return num
    if cfg.selection_epsilon <= 0:
        return 0
    gen = torch.Generator().manual_seed(derive_seed(seed, step, UNIFORM_STREAM, 1))
    return int((torch.rand(num, generator=gen) < cfg.selection_epsilon).sum())


def draw_uniform_ids(num_prompts: int, num: int, *, seed: int, step: int,
                     stream: int = UNIFORM_STREAM) -> torch.Tensor:
    """``num`` distinct ids drawn uniformly from [0, num_prompts), in random order, in O(num)
    when num is small."""
    if num == 0:
        return torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(derive_seed(seed, step, stream, 0))
    if 2 * num > num_prompts:
        return torch.randperm(num_prompts, generator=gen)[:num]
    drawn, num_distinct = torch.zeros(0, dtype=torch.int64), 0
    while num_distinct < num:  # the first num distinct values of the stream, in its order
        drawn = torch.cat([drawn, torch.randint(0, num_prompts, (2 * (num - num_distinct),),
                                                generator=gen)])
        distinct, inverse = torch.unique(drawn, return_inverse=True)
        num_distinct = len(distinct)
    first = torch.full((num_distinct,), len(drawn)).scatter_reduce(
        0, inverse, torch.arange(len(drawn)), reduce="amin")
    return drawn[torch.sort(first).values[:num]]


def uniform_part(num_prompts: int, num: int, cfg: SelectionConfig, *, seed: int,
                 step: int) -> torch.Tensor:
    """Check ``num`` against the table, then the step's uniformly drawn ids (all ``num`` for
    uniform selection, a Binomial share with --selection-epsilon, else none)."""
    require(1 <= num <= num_prompts, "num_prompts_per_step", num,
            f"must be in [1, {num_prompts}] (the number of prompts in the table)")
    return draw_uniform_ids(num_prompts, num_uniform_slots(num, cfg, seed=seed, step=step),
                            seed=seed, step=step)


def paced_keys(acc_est: torch.Tensor, tie_uniforms: torch.Tensor, cfg: SelectionConfig,
               soft_uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Keys (higher is picked first) of the paced rules for the given estimates."""
    distance = (acc_est.double().clamp(0.0, 1.0) - cfg.target_acc).abs()
    if cfg.prompt_selection == "paced-soft":
        return -distance / cfg.selection_temperature - torch.log(-torch.log(soft_uniforms))
    return -distance - 1e-12 * tie_uniforms


def _top(keys: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by key, exact ties ordered by prompt id; returns (keys, ids) in pick order."""
    k = min(k, len(keys))
    if k <= 0:
        return keys[:0], ids[:0]
    top_keys, index = torch.topk(keys, k)
    top_ids = ids[index]
    order = torch.from_numpy(np.lexsort((top_ids.numpy(), -top_keys.numpy())))
    return top_keys[order], top_ids[order]


def _top_excluding(keys, ids, k, excluded: torch.Tensor):
    keep = ~torch.isin(ids, excluded)
    return _top(keys[keep], ids[keep], k)


def usable_exclusion(exclude: torch.Tensor | None, num_prompts: int, num: int) -> torch.Tensor:
    """The prompts to keep out of the paced part: ``exclude`` (those in flight), unless too
    few prompts would remain, then none."""
    if exclude is None or num_prompts - len(exclude) < num:
        return torch.zeros(0, dtype=torch.int64)
    return exclude.to(torch.int64)


def select_prompts(acc_est: torch.Tensor, num: int, cfg: SelectionConfig, *, seed: int,
                   step: int, tie_uniforms: torch.Tensor | None = None,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The single-process selection over a full (num_prompts,) estimate vector; the paced
    part never picks a prompt of ``exclude`` (see :meth:`PromptSelector.select`)."""
    num_prompts = len(acc_est)
    exclude = usable_exclusion(exclude, num_prompts, num)
    uniform_ids = uniform_part(num_prompts, num, cfg, seed=seed, step=step)
    n_uniform = len(uniform_ids)
    if n_uniform == num:
        return uniform_ids
    if tie_uniforms is None:
        tie_uniforms = block_uniforms(0, num_prompts, seed=seed, step=-1, stream=TIE_STREAM)
    soft = (block_uniforms(0, num_prompts, seed=seed, step=step, stream=SOFT_STREAM)
            if cfg.prompt_selection == "paced-soft" else None)
    keys = paced_keys(acc_est, tie_uniforms, cfg, soft)
    ids = torch.arange(num_prompts, dtype=torch.int64)
    _, paced_ids = _top_excluding(keys, ids, num - n_uniform, torch.cat([uniform_ids, exclude]))
    return torch.cat([uniform_ids, paced_ids])


class _GreedyPool:
    """This rank's best rows under the greedy key, kept exact as rows change."""

    def __init__(self, table, cfg: SelectionConfig, tie_uniforms: torch.Tensor) -> None:
        self.table, self.cfg, self.tie = table, cfg, tie_uniforms
        self.keys = paced_keys(table.local_acc_est(), tie_uniforms, cfg)
        self.ids = torch.arange(table.row_start, table.row_end, dtype=torch.int64)
        self.pool = self.ids[:0]
        self.threshold = math.inf  # forces a build on first use
        self.in_pool = torch.zeros(len(self.ids), dtype=torch.bool)
        self.num_rebuilds = 0
        table.take_updated_rows()

    def refresh(self) -> None:
        rows = self.table.take_updated_rows()
        if rows is None:
            self.keys = paced_keys(self.table.local_acc_est(), self.tie, self.cfg)
            self.threshold = math.inf
            return
        if len(rows):
            self.keys[rows] = paced_keys(self.table.local_acc_est(rows), self.tie[rows], self.cfg)
            newcomers = rows[(self.keys[rows] > self.threshold) & ~self.in_pool[rows]]
            self.in_pool[newcomers] = True
            self.pool = torch.cat([self.pool, newcomers])

    def candidates(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The local top-k (keys, global ids); every row outside has a key <= threshold."""
        pool_keys = self.keys[self.pool]
        if int((pool_keys > self.threshold).sum()) < k:
            self._rebuild(k)
            pool_keys = self.keys[self.pool]
        eligible = pool_keys > self.threshold
        return _top(pool_keys[eligible], self.ids[self.pool[eligible]], k)

    def _rebuild(self, k: int) -> None:
        size = min(len(self.ids), max(64 * k, 4096))
        _, rows = torch.topk(self.keys, size)
        self.in_pool.zero_()
        self.in_pool[rows] = True
        self.pool = rows
        # Rows outside have keys <= the smallest pool key; keep strictly-greater ones eligible.
        self.threshold = -math.inf if size == len(self.ids) else float(
            torch.max(self.keys[~self.in_pool]))
        self.num_rebuilds += 1


class PromptSelector:
    """Selection over a :class:`~megatron_paced.paced.log_z.ShardedLogZ`, same on every rank."""

    def __init__(self, cfg: SelectionConfig, *, seed: int,
                 dp_group: dist.ProcessGroup | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.seed = seed
        self.dp_group = dp_group
        self._tie: torch.Tensor | None = None
        self._pool: _GreedyPool | None = None

    def select(self, table, num: int, step: int,
               exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The step's ``num`` prompts (log-Z rows). ``exclude``: rows the paced rule must not
        pick, the same on every rank (with --max-staleness, the prompts selected for the
        steps still in flight: their estimates have not learned from them yet, and the rule
        would pick them again); ignored when fewer than ``num`` prompts would remain."""
        cfg, seed = self.cfg, self.seed
        exclude = usable_exclusion(exclude, table.num_prompts, num)
        if table.scores_change_every_step and cfg.prompt_selection != "uniform":
            return self._select_from_candidates(table, num, step, exclude)
        if table.num_prompts <= cfg.selection_gather_max:
            if self._tie is None:
                self._tie = block_uniforms(0, table.num_prompts, seed=seed, step=-1,
                                           stream=TIE_STREAM)
            return select_prompts(table.gather_acc_est(), num, cfg, seed=seed, step=step,
                                  tie_uniforms=self._tie, exclude=exclude)
        uniform_ids = uniform_part(table.num_prompts, num, cfg, seed=seed, step=step)
        n_uniform = len(uniform_ids)
        if n_uniform == num:
            return uniform_ids
        k = num + len(exclude)  # the local top-k keeps the global top-num outside exclude
        if cfg.prompt_selection == "paced-greedy":
            if self._pool is None:
                tie = block_uniforms(table.row_start, table.row_end, seed=seed, step=-1,
                                     stream=TIE_STREAM)
                self._pool = _GreedyPool(table, cfg, tie)
            self._pool.refresh()
            local_keys, local_ids = self._pool.candidates(k)
        else:
            soft = block_uniforms(table.row_start, table.row_end, seed=seed, step=step,
                                  stream=SOFT_STREAM)
            keys = paced_keys(table.local_acc_est(), soft, cfg, soft)
            ids = torch.arange(table.row_start, table.row_end, dtype=torch.int64)
            local_keys, local_ids = _top(keys, ids, k)
        cand_keys, cand_ids = self._gather_candidates(local_keys, local_ids, k)
        _, paced_ids = _top_excluding(cand_keys, cand_ids, num - n_uniform,
                                      torch.cat([uniform_ids, exclude]))
        return torch.cat([uniform_ids, paced_ids])

    def _select_from_candidates(self, table, num: int, step: int,
                                exclude: torch.Tensor) -> torch.Tensor:
        """A seeded uniform pool scored through ``table.acc_est`` (collective)."""
        cfg, seed = self.cfg, self.seed
        uniform_ids = uniform_part(table.num_prompts, num, cfg, seed=seed, step=step)
        n_uniform = len(uniform_ids)
        size = min(table.num_prompts, max(cfg.selection_candidates, num + len(exclude)))
        pool = draw_uniform_ids(table.num_prompts, size, seed=seed, step=step,
                                stream=CANDIDATE_STREAM)
        pool = pool[~torch.isin(pool, torch.cat([uniform_ids, exclude]))]
        position = torch.arange(len(pool), dtype=torch.float64) / max(len(pool), 1)
        soft = None
        if cfg.prompt_selection == "paced-soft":
            gen = torch.Generator().manual_seed(derive_seed(seed, step, SOFT_STREAM, 0))
            soft = torch.rand(len(pool), generator=gen, dtype=torch.float64).clamp_(min=1e-300)
        keys = paced_keys(table.acc_est(pool), position, cfg, soft)
        _, order = torch.sort(keys, descending=True, stable=True)
        return torch.cat([uniform_ids, pool[order[:num - n_uniform]]])

    def _gather_candidates(self, keys: torch.Tensor, ids: torch.Tensor, k: int):
        pad = k - len(keys)  # a rank with fewer rows than k pads with -inf / id -1
        local = torch.stack([
            torch.cat([keys, torch.full((pad,), -math.inf, dtype=torch.float64)]),
            torch.cat([ids, torch.full((pad,), -1, dtype=torch.int64)]).double()])
        gathered = [local]
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            gathered = [torch.empty_like(local)
                        for _ in range(dist.get_world_size(self.dp_group))]
            dist.all_gather(gathered, local, group=self.dp_group)
        both = torch.cat(gathered, dim=1)
        valid = both[1] >= 0
        return both[0][valid], both[1][valid].long()

    def state_dict(self) -> dict:
        """The selector is stateless across steps (its randomness is keyed by the step); the
        config and seed are saved so that a resume can check they did not change."""
        return {"seed": self.seed, "cfg": dict(vars(self.cfg))}

    def load_state_dict(self, state: dict) -> list[str]:
        """Compare a checkpoint's settings with this selector's (nothing else to restore);
        returns each difference as ``--flag now (checkpoint: then)``."""
        saved = {"seed": state.get("seed"), **state.get("cfg", {})}
        now = {"seed": self.seed, **vars(self.cfg)}
        return [f"--{name.replace('_', '-')} {now.get(name)} (checkpoint: {value})"
                for name, value in sorted(saved.items()) if now.get(name) != value]
