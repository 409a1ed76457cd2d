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

Usage::

    collector = Collector(task, rollout, selector, log_z, sampling, ctx,
                          num_prompts_per_step=16, num_samples_per_prompt=8, seq_length=256)
    groups = collector.collect(step)             # ScoredGroups of this DP rank
    groups.fresh                                 # their (P * G) rows, padded to seq_length
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_paced.forward_backward import SequenceBatch
from megatron_paced.rollout.engine import completions_to_batch

# Dynamic-sampling round r of step s selects and samples as "step" s + r * this (no two
# (step, round) pairs collide below 1e6 steps).
DYNAMIC_ROUND_STRIDE = 1_000_003


@dataclass
class ScoredGroups:
    """This DP rank's groups of one step."""

    prompt_rows: torch.Tensor
    """(P,) log-Z rows (indices into the task's problems)."""
    problems: list
    """The P problems (``problem.prompt_id`` is the dataset's stable id)."""
    completions: list
    """P lists of G :class:`~megatron_paced.rollout.engine.Completion`."""
    fresh: SequenceBatch
    """The (P * G) prompt + completion rows in (prompt, sample) order, right-padded to the
    collector's ``seq_length``, with the engine's log-probs as ``extras["rollout_log_probs"]``."""
    rewards: torch.Tensor
    """(P, G) rewards in [0, 1]."""
    num_generated: int
    """Completions generated this step on all DP ranks (every dynamic-sampling round)."""
    selection_seconds: float
    """Time spent selecting prompts (PACED's bookkeeping), every round."""


def stop_error(step: int, err, problems) -> FloatingPointError:
    """The error that stops the run at a non-finite value, naming the step and prompts."""
    prompt_ids = [getattr(p, "prompt_id", p) for p in problems]
    shown = ", ".join(str(i) for i in prompt_ids[:8]) + (", ..." if len(prompt_ids) > 8 else "")
    return FloatingPointError(f"step {step}: {err}; prompt ids [{shown}]; stopping, the last "
                              "checkpoint is intact")


@dataclass
class _Answer:
    """What the rank that asked the backend sends the rest of its replica."""

    completions: list | None = None
    error: str | None = None


class Collector:
    """select -> generate -> score over the run's components."""

    def __init__(self, task, rollout, selector, log_z, sampling, ctx, *,
                 num_prompts_per_step: int, num_samples_per_prompt: int,
                 seq_length: int, dynamic_sampling: bool = False,
                 dynamic_sampling_max_rounds: int = 1) -> None:
        self.task, self.rollout, self.selector, self.log_z = task, rollout, selector, log_z
        self.sampling, self.ctx, self.seq_length = sampling, ctx, seq_length
        self.num_prompts_per_step = num_prompts_per_step
        self.num_samples_per_prompt = num_samples_per_prompt
        self.dynamic_sampling = dynamic_sampling
        self.max_rounds = dynamic_sampling_max_rounds if dynamic_sampling else 1

    def select(self, step: int) -> torch.Tensor:
        """This DP rank's share of the globally selected prompts (log-Z rows)."""
        chosen = self.selector.select(self.log_z, self.num_prompts_per_step, step)
        per_rank = len(chosen) // self.ctx.dp_size
        return chosen[self.ctx.dp_rank * per_rank:(self.ctx.dp_rank + 1) * per_rank]

    def generate(self, problems: list, n: int, seed: int, step: int,
                 prompts: list[list[int]] | None = None) -> list:
        """``n`` completions of each problem (``step``: the step an error names; ``prompts``:
        the problems' tokens, if the caller has them)."""
        from megatron_paced.parallel import broadcast_objects_in_replica

        if prompts is None:
            prompts = [self.task.prompt_tokens(p) for p in problems]
        once = self.rollout.asked_once_per_replica
        answer = _Answer()
        if not once or (self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0):
            try:
                answer.completions = self.rollout.generate(prompts, n=n, sampling=self.sampling,
                                                           seed=seed)
            except FloatingPointError as err:
                answer.error = str(err)
        if once:
            answer = broadcast_objects_in_replica(answer, self.ctx)
        if answer.error is not None:
            raise stop_error(step, answer.error, problems)
        return answer.completions

    def score(self, problems: list, completions: list, step: int) -> torch.Tensor:
        """(P, G) rewards in [0, 1] from the task's verifier."""
        rewards = self.task.score(problems, completions)
        if not torch.isfinite(rewards).all():
            raise stop_error(step, "non-finite rewards from the verifier", problems)
        return rewards

    def collect(self, step: int) -> ScoredGroups:
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
                            torch.stack(rewards), int(total.item()), selection_seconds)
