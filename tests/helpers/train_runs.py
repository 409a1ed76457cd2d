"""Tiny ``paced-train`` runs for the end-to-end tests: their flags, launching them on gloo
processes, and reading back their ``metrics.jsonl``.

:data:`COMMON` is a run of the tiny built-in model on the arithmetic task (4 prompts x 4
samples per step, a 30-step SFT warm start, replay, a checkpoint every 2 steps); the tests add
``--train-iters``, ``--save`` and what they exercise. :func:`run_train` launches it with
torchrun and fails the test unless the exit code matches ``expect``: 0 for success, and for a
non-zero ``expect`` any failing exit passes. :func:`read_metrics` maps each step to its
metrics row without the wall-clock timings (:data:`TIMINGS`), so that two runs of the same
seed compare equal. :func:`rollout_server_flags` launches the project's rollout server
(SGLang's API) with the tiny model's shape on a free port.

Usage::

    from tests.helpers.train_runs import COMMON, read_metrics, run_train

    run_train(COMMON + ["--train-iters", "4", "--save", str(tmp_path / "run")])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[4]["num_samples"] == 64
"""

from __future__ import annotations

import json
import sys

from megatron_paced.testing.distributed import launch_workers
from megatron_paced.utils import free_port

COMMON = ["--num-prompts-per-step", "4", "--num-samples-per-prompt", "4", "--micro-batch-size",
          "5", "--task-num-prompts", "64", "--task-max-digits", "2", "--sft-warmup-iters", "30",
          "--replay-size", "16", "--replay-per-step", "4", "--no-replay-successful-only",
          "--save-interval", "2", "--max-new-tokens", "6"]
TIMINGS = ("step_time_s", "rollout_time_s", "paced_overhead_s")
# The tiny model's shape, as the rollout server's flags (it builds the same model).
SERVER_SHAPE = ("--num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4 "
                "--num-query-groups 2 --max-position-embeddings 64 --vocab-size 17 "
                "--max-sequence-length 64")


def run_train(args: list[str], nprocs: int = 2, expect: int = 0):
    """``megatron_paced.train`` with ``args`` on ``nprocs`` processes (600 s at most); returns
    the launch result (``returncode``, ``output``)."""
    result = launch_workers("megatron_paced.train", nprocs=nprocs, args=args, timeout_s=600)
    assert result.returncode == expect or (expect and result.returncode != 0), \
        f"exit {result.returncode}, expected {expect}:\n{result.output[-5000:]}"
    return result


def read_metrics(path, check_order: bool = True) -> dict[int, dict]:
    """``metrics.jsonl`` as {step: row without :data:`TIMINGS`}; with ``check_order``, fails
    on a step logged twice or out of order (a resume that logs a step again)."""
    rows = [json.loads(line) for line in open(path)]
    if check_order:
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), f"duplicate or unordered steps: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}


def rollout_server_flags(server_args: str = "", port: int | None = None) -> list[str]:
    """``--rollout-backend sglang`` flags that launch ``megatron_paced.rollout.serve`` with
    :data:`SERVER_SHAPE` and ``server_args``, the servers' ports from ``port`` (default: a
    free one)."""
    return ["--rollout-backend", "sglang", "--sglang-launch-command",
            f"{sys.executable} -m megatron_paced.rollout.serve", "--sglang-server-args",
            f"{SERVER_SHAPE} {server_args}" if server_args else SERVER_SHAPE,
            "--sglang-base-port", str(port or free_port(count=4))]
