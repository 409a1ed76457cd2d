"""Collecting a step's scored groups: select -> generate -> score (-> more rounds).

Every rank selects the same global prompts (over the sharded log-Z table) and keeps its DP
share; the rollout backend samples ``G`` completions of each (the embedded engine on every
rank of the replica, SGLang once per replica with the answer broadcast over TP, then PP); the
task's verifier scores them. With ``--dynamic-sampling`` (DAPO), rounds of fresh prompts
follow until every rank holds its share of groups whose rewards differ; round ``r`` of step
``s`` draws as "step" ``s + r * DYNAMIC_ROUND_STRIDE``, so round 0 is the plain step.

A non-finite value (logits while sampling, a reward) stops the run with a
:class:`FloatingPointError` naming the step and the dataset prompt ids; a backend asked once
per replica sends the error to the other ranks, so all of them stop at the same step.

Two collectors share one interface (:class:`Collector`): :class:`SyncCollector` generates
each step's groups at the step (with dynamic sampling's rounds), :class:`AheadCollector`
(``--max-staleness K >= 1``) submits each step's rollouts K steps ahead and keeps what is in
flight in the checkpoint; :func:`build_collector` picks by the flag.

Usage::

    collector = build_collector(task, rollout, selector, estimator, sampling, ctx,
                                num_prompts_per_step=16, num_samples_per_prompt=8,
                                seq_length=256, max_staleness=0)
    groups = collector.collect(step, last_step)  # ScoredGroups of this DP rank
    groups.fresh                                 # their (P * G) rows, padded to seq_length
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_paced.config import ConfigError
from megatron_paced.parallel import broadcast_objects_in_replica
from megatron_paced.rollout.engine import Completion, RolloutBatch, completions_to_batch

# Dynamic-sampling round r of step s selects and samples as "step" s + r * this (no two
# (step, round) pairs collide below 1e6 steps).
DYNAMIC_ROUND_STRIDE = 1_000_003
# A group dropped past the staleness bound at step s is generated again with seed s + this.
STALE_SEED_OFFSET = 3 * 10**6


@dataclass
class ScoredGroups:
    """This DP rank's groups of one step."""

    prompt_rows: torch.Tensor
    """(P,) log-Z rows (indices into the task's problems)."""
    problems: list
    """The P problems (``problem.prompt_id`` is the dataset's stable id)."""
    completions: list
    """P lists of G :class:`~megatron_paced.rollout.engine.Completion`."""
    fresh: RolloutBatch
    """The (P * G) prompt + completion rows in (prompt, sample) order, right-padded to the
    collector's ``seq_length``, with the engine's log-probs (a
    :class:`~megatron_paced.rollout.engine.RolloutBatch`)."""
    rewards: torch.Tensor
    """(P, G) rewards in [0, 1]."""
    num_generated: int
    """Completions generated this step on all DP ranks (every dynamic-sampling round)."""
    selection_seconds: float
    """Time spent selecting prompts (PACED's bookkeeping), every round."""
    staleness: torch.Tensor | None = None
    """(P, G) optimizer steps between each sample's weights and pi_old ((step - 1) minus its
    weight version): 0 for a synchronous step, at most --max-staleness."""
    num_dropped: int = 0
    """Samples past the staleness bound on all DP ranks, dropped (not trained) and generated
    again on the latest weights."""


@dataclass
class RolloutJob:
    """One step's rollouts, submitted ahead (--max-staleness): this rank's prompt rows and
    the backend's future (on the ranks that ask it) until resolved into completions."""

    step: int
    rows: torch.Tensor
    min_version: int
    global_rows: torch.Tensor
    """Every DP rank's rows of the step (kept out of the selections made while in flight)."""
    handle: object = None
    completions: list | None = None
    selection_seconds: float = 0.0


def stop_error(step: int, err, prompt_ids: list) -> FloatingPointError:
    """The error that stops the run at a non-finite value, naming the step and the dataset's
    prompt ids."""
    shown = ", ".join(str(i) for i in prompt_ids[:8]) + (", ..." if len(prompt_ids) > 8 else "")
    return FloatingPointError(f"step {step}: {err}; prompt ids [{shown}]; stopping, the last "
                              "checkpoint is intact")


@dataclass
class _Answer:
    """What the rank that asked the backend sends the rest of its replica."""

    completions: list | None = None
    error: str | None = None


class Collector:
    """select -> generate -> score over the run's components; :meth:`collect` is the step's
    (the subclasses'), :meth:`generate` and :meth:`score` serve evaluation and the probe."""

    def __init__(self, task, rollout, selector, estimator, sampling, ctx, *,
                 num_prompts_per_step: int, num_samples_per_prompt: int,
                 seq_length: int) -> None:
        self.task, self.rollout, self.selector, self.estimator = task, rollout, selector, estimator
        self.sampling, self.ctx, self.seq_length = sampling, ctx, seq_length
        self.num_prompts_per_step = num_prompts_per_step
        self.num_samples_per_prompt = num_samples_per_prompt

    def collect(self, step: int, last_step: int | None = None) -> ScoredGroups:
        """The step's groups on this rank (``last_step``: the run's last, --train-iters)."""
        raise NotImplementedError

    def share_of(self, chosen: torch.Tensor) -> torch.Tensor:
        """This DP rank's share of the prompts every rank selected alike."""
        per_rank = len(chosen) // self.ctx.dp_size
        return chosen[self.ctx.dp_rank * per_rank:(self.ctx.dp_rank + 1) * per_rank]

    def asks_backend(self) -> bool:
        """Whether this rank calls the backend (else its replica's first rank answers it)."""
        return not self.rollout.asked_once_per_replica or (
            self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0)

    def in_replica(self, produce, step: int, problems: list) -> list:
        """``produce()``'s completions, called on the ranks that ask the backend and sent to
        the rest of the replica; a non-finite value stops every rank at ``step``."""
        answer = _Answer()
        if self.asks_backend():
            try:
                answer.completions = produce()
            except FloatingPointError as err:
                answer.error = str(err)
        if self.rollout.asked_once_per_replica:
            answer = broadcast_objects_in_replica(answer, self.ctx)
        if answer.error is not None:
            raise stop_error(step, answer.error, [p.prompt_id for p in problems])
        return answer.completions

    def generate(self, problems: list, n: int, seed: int, step: int,
                 prompts: list[list[int]] | None = None) -> list:
        """``n`` completions of each problem (``step``: the step an error names; ``prompts``:
        the problems' tokens, if the caller has them)."""
        if prompts is None:
            prompts = [self.task.prompt_tokens(p) for p in problems]
        return self.in_replica(lambda: self.rollout.generate(prompts, n=n, sampling=self.sampling,
                                                             seed=seed), step, problems)

    def score(self, problems: list, completions: list, step: int) -> torch.Tensor:
        """(P, G) rewards in [0, 1] from the task's verifier."""
        rewards = self.task.score(problems, completions)
        if not torch.isfinite(rewards).all():
            raise stop_error(step, "non-finite rewards from the verifier",
                             [p.prompt_id for p in problems])
        return rewards

    def drain(self) -> None:
        """Let the backend finish what it runs in the background."""
        self.rollout.drain()

    def pending_state(self) -> dict | None:
        """What a checkpoint holds of the rollouts made for later steps (collective)."""
        return None

    def restore_pending(self, state: dict | None, flag: str) -> None:
        """Take back the rollouts a checkpoint holds (``flag`` names --load in errors); a
        collector that generates at the step generates them afresh."""


class SyncCollector(Collector):
    """Each step's groups generated at the step, on pi_old; with ``dynamic_sampling``
    (DAPO), rounds of fresh prompts until every rank holds its share of groups whose rewards
    differ (at most ``dynamic_sampling_max_rounds``)."""

    def __init__(self, *args, dynamic_sampling: bool = False,
                 dynamic_sampling_max_rounds: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dynamic_sampling = dynamic_sampling
        self.max_rounds = dynamic_sampling_max_rounds if dynamic_sampling else 1

    def select(self, step: int) -> torch.Tensor:
        """This DP rank's share of the globally selected prompts (log-Z rows)."""
        return self.share_of(self.selector.select(self.estimator, self.num_prompts_per_step,
                                                  step))

    def collect(self, step: int, last_step: int | None = None) -> ScoredGroups:
        """The step's groups on this rank (collective over DP with dynamic sampling)."""
        per_rank = self.num_prompts_per_step // self.ctx.dp_size
        collected, num_informative, num_generated, selection_seconds = [], 0, 0, 0.0
        for round_index in range(self.max_rounds):
            key = step + round_index * DYNAMIC_ROUND_STRIDE
            start = time.perf_counter()
            rows = self.select(key)
            selection_seconds += time.perf_counter() - start
            problems = [self.task.problems[int(i)] for i in rows]
            prompts = [self.task.prompt_tokens(p) for p in problems]
            completions = self.generate(problems, self.num_samples_per_prompt, key, step,
                                        prompts)
            rewards = self.score(problems, completions, step)
            num_generated += rewards.numel()
            for i in range(len(problems)):
                differs = bool(rewards[i].max() > rewards[i].min())
                collected.append((not differs, rows[i], problems[i], completions[i], rewards[i],
                                  prompts[i]))
                num_informative += differs
            if not self.dynamic_sampling:
                break
            enough = torch.tensor([float(num_informative >= per_rank)])
            dist.all_reduce(enough, op=dist.ReduceOp.MIN)  # every rank runs the same rounds
            if enough.item():
                break
        total = torch.tensor([float(num_generated * self.ctx.dp_size)])
        if self.dynamic_sampling:  # groups whose rewards differ first (a stable sort)
            collected = sorted(collected, key=lambda group: group[0])[:per_rank]
            total = torch.tensor([float(num_generated)])
            dist.all_reduce(total, group=self.ctx.dp_group)
        _, rows, problems, completions, rewards, prompts = zip(*collected)
        fresh = completions_to_batch(list(prompts), list(completions), self.seq_length)
        return ScoredGroups(torch.stack(rows), list(problems), list(completions), fresh,
                            torch.stack(rewards), int(total.item()), selection_seconds,
                            torch.zeros(len(rows), self.num_samples_per_prompt))


class AheadCollector(Collector):
    """``--max-staleness K >= 1``: step j's rollouts are submitted at the start of step
    j - K on weights of version j - K - 1 (:mod:`megatron_paced.rollout.async_rollout`); a
    group with a sample past the bound is dropped, counted and generated again."""

    def __init__(self, *args, max_staleness: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_staleness = max_staleness
        self.jobs: dict[int, RolloutJob] = {}
        self.last_submitted = -1  # the last step whose rollouts were submitted

    def submit(self, step: int) -> None:
        """Select step ``step``'s prompts now and queue their rollouts on weights of version
        ``step - K - 1`` (see :mod:`megatron_paced.rollout.async_rollout`)."""
        start = time.perf_counter()
        in_flight = [job.global_rows for job in self.jobs.values()]
        chosen = self.selector.select(self.estimator, self.num_prompts_per_step, step,
                                      exclude=torch.cat(in_flight) if in_flight else None)
        rows = self.share_of(chosen)
        seconds = time.perf_counter() - start
        job = RolloutJob(step, rows, step - self.max_staleness - 1, chosen,
                         selection_seconds=seconds)
        if self.asks_backend():
            prompts = [self.task.prompt_tokens(self.task.problems[int(i)]) for i in rows]
            job.handle = self.rollout.submit(prompts, n=self.num_samples_per_prompt,
                                             sampling=self.sampling, seed=step,
                                             min_version=job.min_version)
        self.jobs[step] = job
        self.last_submitted = step

    def resolve(self, job: RolloutJob) -> list:
        """The job's completions on every rank of the replica (waits for the backend)."""
        if job.completions is None:
            job.completions = self.in_replica(
                lambda: job.handle.result(), job.step,
                [self.task.problems[int(i)] for i in job.rows])
            job.handle = None
        return job.completions

    def collect(self, step: int, last_step: int | None = None) -> ScoredGroups:
        """Step ``step``'s groups with rollouts submitted K steps ahead (up to
        ``last_step``); a group with a sample past the bound is dropped, counted and
        generated again on the latest weights (collective over DP)."""
        bound = self.max_staleness
        last_step = step if last_step is None else last_step
        self.last_submitted = max(self.last_submitted, step - 1)
        while self.last_submitted < min(step + bound, last_step):
            self.submit(self.last_submitted + 1)
        job = self.jobs.pop(step)
        completions = list(self.resolve(job))
        problems = [self.task.problems[int(i)] for i in job.rows]
        staleness = staleness_of(completions, step, job.min_version)
        stale = (staleness > bound).any(dim=1).nonzero().flatten().tolist()
        num_dropped = len(stale) * self.num_samples_per_prompt
        if stale:
            again = self.generate([problems[i] for i in stale], self.num_samples_per_prompt,
                                  step + STALE_SEED_OFFSET, step)
            for i, group in zip(stale, again):
                completions[i] = group
            staleness = staleness_of(completions, step, step - 1)
        rewards = self.score(problems, completions, step)
        prompts = [self.task.prompt_tokens(p) for p in problems]
        totals = torch.tensor([float(rewards.numel() + num_dropped), float(num_dropped)])
        dist.all_reduce(totals, group=self.ctx.dp_group)
        fresh = completions_to_batch(prompts, completions, self.seq_length)
        return ScoredGroups(job.rows, problems, completions, fresh, rewards, int(totals[0]),
                            job.selection_seconds, staleness, int(totals[1]))

    def pending_state(self) -> dict | None:
        """The rollouts submitted for later steps, resolved, of every DP rank (collective):
        what a checkpoint holds so that the resumed run trains on the same samples."""
        mine = []
        for step in sorted(self.jobs):
            job = self.jobs[step]
            mine.append({"step": step, "rows": job.rows.tolist(), "min_version": job.min_version,
                         "global_rows": job.global_rows.tolist(),
                         "selection_seconds": job.selection_seconds,
                         "completions": [[[c.sample_index, c.token_ids, c.log_probs,
                                           c.finish_reason, c.weight_version] for c in group]
                                         for group in self.resolve(job)]})
        every = [None] * self.ctx.dp_size
        dist.all_gather_object(every, mine, group=self.ctx.dp_group)
        return {"max_staleness": self.max_staleness, "dp_size": self.ctx.dp_size,
                "jobs": every}

    def restore_pending(self, state: dict | None, flag: str) -> None:
        """Take back the rollouts a checkpoint holds (``flag`` names --load in errors)."""
        if not state or not any(state["jobs"]):
            return
        if state["dp_size"] != self.ctx.dp_size:
            raise ConfigError(f"{flag}: the checkpoint holds rollouts generated ahead "
                              f"(--max-staleness {state['max_staleness']}) for "
                              f"{state['dp_size']} data-parallel ranks; resume it on "
                              f"{state['dp_size']}, not {self.ctx.dp_size}")
        for item in state["jobs"][self.ctx.dp_rank]:
            completions = [[Completion(p, s, tokens, log_probs, finish, version)
                            for s, tokens, log_probs, finish, version in group]
                           for p, group in enumerate(item["completions"])]
            self.jobs[item["step"]] = RolloutJob(
                item["step"], torch.tensor(item["rows"], dtype=torch.int64), item["min_version"],
                torch.tensor(item["global_rows"], dtype=torch.int64), None, completions,
                item["selection_seconds"])
            self.last_submitted = max(self.last_submitted, item["step"])


def staleness_of(completions: list, step: int, scheduled_version: int) -> torch.Tensor:
    """(P, G) ``(step - 1) - weight_version`` of each sample (the scheduled version where the
    backend did not tag one)."""
    return torch.tensor([[float(step - 1 - (scheduled_version if c.weight_version is None
                                            else c.weight_version)) for c in group]
                         for group in completions])


def build_collector(task, rollout, selector, estimator, sampling, ctx, *,
                    num_prompts_per_step: int, num_samples_per_prompt: int, seq_length: int,
                    dynamic_sampling: bool = False, dynamic_sampling_max_rounds: int = 1,
                    max_staleness: int = 0) -> Collector:
    """The collector of ``--max-staleness`` (0: :class:`SyncCollector`)."""
    args = (task, rollout, selector, estimator, sampling, ctx)
    kwargs = dict(num_prompts_per_step=num_prompts_per_step,
                  num_samples_per_prompt=num_samples_per_prompt, seq_length=seq_length)
    if max_staleness:
        return AheadCollector(*args, max_staleness=max_staleness, **kwargs)
    return SyncCollector(*args, dynamic_sampling=dynamic_sampling,
                         dynamic_sampling_max_rounds=dynamic_sampling_max_rounds, **kwargs)
