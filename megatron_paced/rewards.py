"""Verifiable rewards: a registry of scorers, and math answers checked by math-verify in
worker processes with a per-answer time limit.

A reward function maps completions (decoded text) and reference answers to scores in [0, 1]
and counts what went wrong::

    reward_fn(completions: list[str], answers: list[str]) -> RewardResult
        .scores (B,) float32, .num_timeouts, .num_errors

Registered:

* ``math``: math-verify equivalence of the completion's final answer (the last ``\\boxed{}``,
  or the text after the last ``####``, else the last expression) with the reference. Each
  answer is checked in a worker process; an answer that takes longer than ``timeout_s``
  scores 0, is counted, and its worker is killed and replaced, so a pathological completion
  can neither hang nor crash training.
* ``exact``: 1 if the stripped completion equals the stripped answer (the built-in
  arithmetic tasks).

Usage::

    reward_fn = get_reward("math", num_workers=2, timeout_s=5.0)
    result = reward_fn(["... so \\\\boxed{18}", "#### 17"], ["18", "18"])
    result.scores, result.num_timeouts          # tensor([1., 0.]), 0
    reward_fn.close()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_paced.verifiers import TimeoutWorkerPool, math_verify_score


@dataclass
class RewardResult:
    scores: torch.Tensor
    num_timeouts: int = 0
    num_errors: int = 0


REWARDS: dict[str, Callable[..., "object"]] = {}


def register_reward(name: str):
    def wrap(factory):
        REWARDS[name] = factory
        return factory
    return wrap


def get_reward(name: str, **kwargs):
    if name not in REWARDS:
        raise ValueError(f"--reward {name!r}: unknown; registered: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**kwargs)


@register_reward("math")
class MathVerifyReward:
    """math-verify equivalence, in worker processes with a per-answer time limit."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
                 score_fn: Callable[[str, str], float] = math_verify_score) -> None:
        self.pool = TimeoutWorkerPool(score_fn, num_workers, timeout_s)

    def __call__(self, completions: list[str], answers: list[str]) -> RewardResult:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
        scores, timeouts, errors = self.pool.map(list(zip(completions, answers)))
        return RewardResult(torch.tensor(scores, dtype=torch.float32), timeouts, errors)

    def close(self) -> None:
        self.pool.close()


@register_reward("exact")
class ExactMatchReward:
    """1 when the stripped completion equals the stripped answer (built-in tasks)."""

    def __init__(self, **unused) -> None:
        pass

    def __call__(self, completions: list[str], answers: list[str]) -> RewardResult:
        scores = [float(c.strip() == a.strip()) for c, a in zip(completions, answers, strict=True)]
        return RewardResult(torch.tensor(scores, dtype=torch.float32))

    def close(self) -> None:
        pass
