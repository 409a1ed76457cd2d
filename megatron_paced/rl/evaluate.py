"""Held-out evaluation: unbiased pass@k from ``--eval-k`` samples of every held-out prompt.

pass@k of a prompt with c correct of n samples is 1 - C(n-c, k) / C(n, k) (Chen et al. 2021);
the reported figure is its mean over the held-out prompts, for k = 1, 2, 4, ... up to n. The
prompts are split over the DP ranks (the last rank may get fewer, or none) and the sums
all-reduced, so every rank returns the same numbers.

Usage::

    metrics = evaluate(eval_problems, sample_rewards, eval_k=4, seed=EVAL_SEED_OFFSET + step,
                       ctx=ctx)       # {"eval_pass@1": ..., "eval_pass@2": ..., "eval_pass@4": ...}
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist

# (problems, n, seed) -> (P, n) rewards of n sampled completions of each problem.
SampleRewards = Callable[[Sequence, int, int], torch.Tensor]


def pass_at_k(num_correct: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Unbiased pass@k of each prompt from c correct of n samples: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), float64 (P,)."""
    c = num_correct.to(torch.float64)
    fail = torch.ones_like(c)
    for i in range(k):  # C(n-c, k) / C(n, k) = prod_{i<k} (n-c-i) / (n-i)
        fail = fail * ((n - c - i).clamp(min=0) / (n - i))
    return 1.0 - fail


def evaluate(problems: Sequence, sample_rewards: SampleRewards, *, eval_k: int, seed: int,
             ctx) -> dict[str, float]:
    """pass@k for k = 1, 2, 4, ... and ``eval_k`` over ``problems`` (collective over DP)."""
    per_rank = math.ceil(len(problems) / ctx.dp_size)
    mine = problems[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
    ks = sorted({2 ** i for i in range(eval_k.bit_length()) if 2 ** i <= eval_k} | {eval_k})
    sums = torch.zeros(len(ks), dtype=torch.float64)  # sum over prompts of pass@k, each k
    if mine:
        num_correct = sample_rewards(mine, eval_k, seed).gt(0).sum(dim=1)
        sums = torch.stack([pass_at_k(num_correct, eval_k, k).sum() for k in ks])
    dist.all_reduce(sums, group=ctx.dp_group)
    return {f"eval_pass@{k}": float(total / len(problems)) for k, total in zip(ks, sums)}
