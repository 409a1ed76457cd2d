"""Accuracy-estimate-error-prioritized replay, distributed over data-parallel ranks.

After a group of G samples of prompt x is scored, the observed accuracy is p_obs = mean
reward and every sample of the group gets priority

    priority = |acc_est(x) - p_obs|        (acc_est = beta * log_z[x] read before the update)

(``--replay-priority uniform`` gives every sample priority 1). The buffer keeps the
``--replay-size`` highest-priority samples (ties: the newer wins); each step first draws
``--replay-per-step`` of them with replacement, with probability proportional to priority,
from the buffer as the earlier steps left it (a sample is never drawn in the step that added
it), then offers its own samples. A stored sample keeps its token ids, completion mask, the
log-probs of the policy that generated it, its reward, its group's observed accuracy, its
prompt's log-Z row and policy version. Priorities are fixed when a sample is added (the
paper's rule: the estimate error when the sample was drawn); ``--replay-rescore`` re-scores
them against the current estimate before every draw.

Distribution over DP ranks: a sample lives on the owner of its row (the same block
partition as the log-Z table). Items are ordered globally by (row, insertion number),
so rank r's items form a contiguous segment of one global list:

* add: candidates that beat the buffer's current admission bar are exchanged, each rank keeps
  the ones it owns, and an all-gather of at most ``replay_size`` priorities per rank finds the
  global cut, so the buffer equals what one global buffer would hold;
* sample: an all-gather of one float per rank (its priority mass) gives each rank its
  segment of [0, total); the draws (from a generator seeded by (seed, step), identical on all
  ranks) that fall in a rank's segment are resolved there, and the drawn samples are
  all-gathered so every rank builds the same batch. The draws equal those of one global
  buffer over the same global list.

Usage::

    replay = DistributedReplay(ReplayConfig(replay_size=128, replay_per_step=16),
                               num_prompts=7473, seed=1, dp_group=ctx.dp_group)
    replay.add(samples, priorities)          # this rank's scored samples
    drawn = replay.sample(step)              # the same list of samples on every rank
    mine = offer_and_draw(replay, prompt_rows, acc_est_before, fresh, rewards, step=step,
                          version=step - 1, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from megatron_paced.config import require
from megatron_paced.paced.partition import PromptPartition
from megatron_paced.utils import derive_seed

REPLAY_STREAM = 77  # derive_seed(seed, step, REPLAY_STREAM) seeds a step's draw


@dataclass
class ReplayConfig:
    """The priority replay buffer."""

    replay_size: int = 128
    """Samples the buffer holds (over all DP ranks); 0 disables replay."""
    replay_per_step: int = 16
    """Samples drawn from the buffer and mixed into each step's batch."""
    replay_priority: Literal["acc-error", "uniform"] = "acc-error"
    """acc-error: |acc_est - observed group accuracy|; uniform: every sample alike."""
    replay_successful_only: bool = True
    """Only successful samples (reward > 0) enter the buffer, as in the paper."""
    replay_old_log_probs: Literal["recompute", "generation"] = "recompute"
    """S_old of a replayed sample: recomputed by the current pi_old (one anchor for every
    row of a prompt, as the TB target needs), or the generating policy's log-probs."""
    replay_updates_log_z: bool = False
    """Let replayed samples move the log-Z table too (an ablation). It breaks Proposition 4.1
    (the success-filtered buffer pulls beta * log_z above the accuracy); it measured better
    sample efficiency only with an SGD lr 0.05 log-Z step (docs/results.md)."""
    replay_rescore: bool = False
    """Before each draw, re-score every stored sample's priority against the current
    estimate (|beta * log_z now - its group's observed accuracy|) instead of keeping the
    priority it had when it was added."""

    def validate(self) -> None:
        require(self.replay_size >= 0, "replay_size", self.replay_size, "must be >= 0")
        require(self.replay_per_step >= 0, "replay_per_step", self.replay_per_step,
                "must be >= 0")
        if self.replay_per_step > 0:
            require(self.replay_size > 0, "replay_per_step", self.replay_per_step,
                    "needs --replay-size > 0")


@dataclass
class ReplaySample:
    """One stored completion with what training on it again needs."""

    row: int
    """Its prompt's log-Z row (the dataset index, not the stable ``prompt_id``)."""
    tokens: torch.Tensor  # (T,) int64
    completion_mask: torch.Tensor  # (T,) float
    old_log_probs: torch.Tensor  # (T,) log-probs of the policy that generated it
    reward: float
    policy_version: int
    priority: float = 0.0
    insertion: int = field(default=-1)  # global insertion number, set by the buffer
    acc_obs: float = math.nan
    """Its group's observed accuracy (for --replay-rescore; NaN: keep the priority)."""

    def order_key(self) -> tuple[int, int]:
        return (self.row, self.insertion)


def priorities_from_groups(acc_est_before: torch.Tensor, rewards: torch.Tensor,
                           group_ids: torch.Tensor) -> torch.Tensor:
    """|acc_est(x) - mean reward of x's group| for every sample: (B,), (B,), (B,) -> (B,)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, rewards.double())
    p_obs = (sums / counts)[inverse]
    return (acc_est_before.double() - p_obs).abs()


class DistributedReplay:
    """This DP rank's share of the global priority replay buffer."""

    def __init__(self, cfg: ReplayConfig, *, num_prompts: int, seed: int,
                 dp_group: dist.ProcessGroup | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.num_prompts = num_prompts
        self.seed = seed
        self.dp_group = dp_group
        self.partition = PromptPartition.of(num_prompts, dp_group)
        self.dp_size, self.dp_rank = self.partition.dp_size, self.partition.dp_rank
        self.items: list[ReplaySample] = []  # sorted by (row, insertion)
        self.num_inserted = 0  # global insertion counter, identical on all ranks

    # ---- collectives -----------------------------------------------------------------------
    def _all_gather_object(self, obj):
        if self.dp_group is None or self.dp_size == 1:
            return [obj]
        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out

    def _all_gather_floats(self, values: torch.Tensor, length: int) -> list[torch.Tensor]:
        """Variable-length float64 vectors (each <= length) from every rank."""
        padded = torch.full((length + 1,), -math.inf, dtype=torch.float64)
        padded[0] = len(values)
        padded[1:1 + len(values)] = values
        if self.dp_group is None or self.dp_size == 1:
            gathered = [padded]
        else:
            gathered = [torch.empty_like(padded) for _ in range(self.dp_size)]
            dist.all_gather(gathered, padded, group=self.dp_group)
        return [g[1:1 + int(g[0])] for g in gathered]

    # ---- add ---------------------------------------------------------------------------------
    def admission_bar(self) -> float:
        """Global priority a new sample must exceed (or tie) to enter a full buffer."""
        local = torch.tensor([s.priority for s in self.items], dtype=torch.float64)
        everyone = torch.cat(self._all_gather_floats(local, self.cfg.replay_size))
        if len(everyone) < self.cfg.replay_size:
            return -math.inf
        return float(torch.topk(everyone, self.cfg.replay_size).values[-1])

    def add(self, samples: list[ReplaySample], priorities: torch.Tensor) -> int:
        """Offer this rank's new samples (collective). Returns the global buffer size."""
        if self.cfg.replay_size == 0:
            return 0
        if len(samples) != len(priorities):
            raise ValueError(f"{len(samples)} samples but {len(priorities)} priorities")
        if not bool(torch.isfinite(torch.as_tensor(priorities, dtype=torch.float64)).all()):
            raise FloatingPointError("non-finite replay priority (a NaN reward?): nothing was "
                                     "added to the replay buffer")
        if self.cfg.replay_priority == "uniform":
            priorities = torch.ones(len(samples), dtype=torch.float64)
        bar = self.admission_bar()
        offered = []
        for sample, priority in zip(samples, priorities.tolist()):
            if self.cfg.replay_successful_only and not sample.reward > 0:
                continue
            if not 0 <= sample.row < self.num_prompts:
                raise ValueError(f"log-Z row {sample.row} is outside the table of "
                                 f"{self.num_prompts} prompts")
            if priority >= bar:
                offered.append((sample, float(priority)))
        # Insertion numbers follow (rank, position): identical on every rank.
        per_rank = self._all_gather_object(offered)
        for rank_offers in per_rank:
            for sample, priority in rank_offers:
                if self.partition.owner_of(sample.row) == self.dp_rank:
                    self.items.append(ReplaySample(
                        sample.row, sample.tokens, sample.completion_mask,
                        sample.old_log_probs, sample.reward, sample.policy_version, priority,
                        self.num_inserted, sample.acc_obs))
                self.num_inserted += 1
        self._evict()
        return self.global_size()

    def _evict(self) -> None:
        """Keep the global top-replay_size by (priority, insertion)."""
        capacity = self.cfg.replay_size
        keys = torch.tensor([s.priority for s in self.items], dtype=torch.float64)
        order = torch.tensor([s.insertion for s in self.items], dtype=torch.float64)
        # Combined key: priority, then newer first. Gather only each rank's top `capacity`.
        local_top = sorted(range(len(self.items)),
                           key=lambda i: (-float(keys[i]), -float(order[i])))[:capacity]
        pairs = torch.stack([keys[local_top], order[local_top]]).flatten() if local_top else \
            torch.zeros(0, dtype=torch.float64)
        gathered = self._all_gather_floats(pairs, 2 * capacity)
        everyone = sorted(((float(g[i]), float(g[len(g) // 2 + i]))
                           for g in gathered for i in range(len(g) // 2)), reverse=True)
        if len(everyone) < capacity:
            keep_from = (-math.inf, -math.inf)
        else:
            keep_from = everyone[capacity - 1]
        self.items = sorted((s for s in self.items if (s.priority, s.insertion) >= keep_from),
                            key=ReplaySample.order_key)

    def global_size(self) -> int:
        sizes = self._all_gather_floats(torch.tensor([float(len(self.items))]), 1)
        return int(sum(float(s[0]) for s in sizes))

    def rescore(self, local_acc_est) -> None:
        """Priorities against the current estimate: ``local_acc_est(rows)`` gives beta * log_z
        of rows this rank owns (the table's partition is the buffer's); samples without an
        observed accuracy keep theirs. Local: no collective."""
        scored = [s for s in self.items if not math.isnan(s.acc_obs)]
        if self.cfg.replay_priority == "uniform" or not scored:
            return
        rows = torch.tensor([s.row for s in scored], dtype=torch.int64)
        acc_obs = torch.tensor([s.acc_obs for s in scored], dtype=torch.float64)
        for sample, priority in zip(scored, (local_acc_est(rows) - acc_obs).abs().tolist()):
            sample.priority = priority

    # ---- sample ------------------------------------------------------------------------------
    def _weights(self) -> torch.Tensor:
        return torch.tensor([s.priority for s in self.items], dtype=torch.float64)

    def sample(self, step: int, num: int | None = None) -> list[ReplaySample]:
        """Draw ``num`` (default --replay-per-step) samples with replacement, in proportion to
        priority; the same list, in draw order, on every rank. Empty if the buffer is."""
        num = self.cfg.replay_per_step if num is None else num
        if num == 0 or self.cfg.replay_size == 0:
            return []
        weights = self._weights()
        masses = torch.cat(self._all_gather_floats(weights.sum().reshape(1), 1))
        ends = torch.cumsum(masses, 0)  # rank r owns [ends[r-1], ends[r]) of [0, total)
        total = float(ends[-1])
        if total <= 0:
            return []
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, REPLAY_STREAM))
        draws = torch.rand(num, generator=gen, dtype=torch.float64) * total
        owners = torch.searchsorted(ends, draws, right=True).clamp(max=self.dp_size - 1)
        mine = owners == self.dp_rank
        offset = float(ends[self.dp_rank - 1]) if self.dp_rank > 0 else 0.0
        cumulative = torch.cumsum(weights, 0)
        found = []
        for index in torch.nonzero(mine).flatten().tolist():
            position = int(torch.searchsorted(cumulative, draws[index] - offset, right=True))
            found.append((index, self.items[min(position, len(self.items) - 1)]))
        drawn = [None] * num
        for rank_found in self._all_gather_object(found):
            for index, sample in rank_found:
                drawn[index] = sample
        return drawn

    # ---- checkpointing -----------------------------------------------------------------------
    _FIELDS = ("row", "tokens", "completion_mask", "old_log_probs", "reward",
               "policy_version", "priority", "insertion", "acc_obs")

    def state_dict(self) -> dict:
        """The whole buffer as plain tensors and numbers (collective: gathered from every
        rank), for the common state of a checkpoint -- the buffer is small by design (the
        paper uses 128 samples)."""
        items = [s for rank_items in self._all_gather_object(self.items) for s in rank_items]
        items.sort(key=ReplaySample.order_key)
        return {"items": [{name: getattr(s, name) for name in self._FIELDS} for s in items],
                "num_inserted": self.num_inserted}

    def load_state_dict(self, state: dict) -> None:
        """Keep the saved samples this rank owns under the current DP size."""
        self.num_inserted = int(state["num_inserted"])
        items = [ReplaySample(**item) for item in state["items"]]
        for item in items:
            if not 0 <= item.row < self.num_prompts:
                raise ValueError(f"replay state holds log-Z row {item.row}, outside the "
                                 f"table of {self.num_prompts} prompts")
        mine = (s for s in items if self.partition.owner_of(s.row) == self.dp_rank)
        self.items = sorted(mine, key=ReplaySample.order_key)


def offer_and_draw(replay: DistributedReplay, prompt_rows: torch.Tensor,
                   acc_est_before: torch.Tensor, fresh, rewards: torch.Tensor, *, step: int,
                   version: int, dp_rank: int = 0, dp_size: int = 1,
                   local_acc_est=None) -> list[ReplaySample]:
    """Replay's part of a step (collective over the replay's DP group): draw the step's
    replayed samples from the buffer as the earlier steps left it (so no sample is drawn in
    the step that added it; with ``local_acc_est``, re-scored first, see
    :meth:`DistributedReplay.rescore`), then offer this rank's fresh samples, each with its
    group's priority |acc_est - acc_obs|; returns this rank's share of the drawn samples.

    ``prompt_rows`` (P,) log-Z rows, ``acc_est_before`` (P,) their beta * log_z before this
    step's update, ``fresh`` the (P * G)-row
    :class:`~megatron_paced.rollout.engine.RolloutBatch`, ``rewards`` (P, G); ``version`` is
    the policy that generated them."""
    if local_acc_est is not None:
        replay.rescore(local_acc_est)
    drawn = replay.sample(step)
    num_groups, group_size = rewards.shape
    acc_obs = rewards.double().mean(dim=1)
    priorities = priorities_from_groups(
        acc_est_before.repeat_interleave(group_size), rewards.flatten(),
        torch.arange(num_groups).repeat_interleave(group_size))
    samples = [ReplaySample(int(prompt_rows[i // group_size]), fresh.tokens[i],
                            fresh.completion_mask[i], fresh.rollout_log_probs[i],
                            float(reward), version, acc_obs=float(acc_obs[i // group_size]))
               for i, reward in enumerate(rewards.flatten().tolist())]
    replay.add(samples, priorities)
    per_rank = len(drawn) // dp_size
    return drawn[dp_rank * per_rank:(dp_rank + 1) * per_rank]
