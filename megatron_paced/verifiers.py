"""Answer checkers, and a pool of worker processes that runs them with a time limit.

This module imports no torch, so a worker process starts in a fraction of a second. A worker
runs ``module:function(*args) -> float``; :class:`TimeoutWorkerPool` gives each call
``timeout_s`` (counted from when the call is sent to a started worker), and a call that runs
over, or a worker that dies, scores 0 and is counted; the worker is killed and replaced.

Usage::

    pool = TimeoutWorkerPool(math_verify_score, num_workers=2, timeout_s=5.0)
    scores, num_timeouts, num_errors = pool.map([("\\boxed{4}", "4"), ("#### 5", "4")])
    pool.close()
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from multiprocessing.connection import Connection, wait
from typing import Callable


def final_answer_text(completion: str) -> str:
    """The part of a completion that holds its final answer: after the last ``####`` if any
    (GSM8K style), else the whole text (math-verify finds the last ``\\boxed{}``)."""
    if "####" in completion:
        return completion.rsplit("####", 1)[1].strip()
    return completion


class _OwnTimeout(logging.Filter):
    """Drops math-verify's notice that its timeout is off: :class:`TimeoutWorkerPool` is the
    timeout (math-verify's own is signal-based, which works only in a main thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.grader", "math_verify.parser"):
    logging.getLogger(_name).addFilter(_OwnTimeout())


def math_verify_score(completion: str, answer: str) -> float:
    """1.0 if math-verify finds the completion's final answer equal to ``answer``."""
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$",
                 parsing_timeout=None)
    predicted = parse(final_answer_text(completion), parsing_timeout=None)
    if not gold or not predicted:
        return 0.0
    return float(verify(gold, predicted, timeout_seconds=None))


def _worker_loop(conn: Connection, fn_module: str, fn_name: str) -> None:
    import importlib

    fn = getattr(importlib.import_module(fn_module), fn_name)
    conn.send("ready")  # the caller's time limits start after start-up
    while True:
        message = conn.recv()
        if message is None:
            return
        job_id, args = message
        try:
            conn.send((job_id, float(fn(*args)), None))
        except Exception as err:  # noqa: BLE001 - a scorer error scores 0 and is counted
            conn.send((job_id, 0.0, repr(err)))


class TimeoutWorkerPool:
    """Processes that run ``module:function(*args) -> float`` with a per-call time limit."""

    def __init__(self, fn: Callable, num_workers: int, timeout_s: float,
                 startup_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"--reward-workers {num_workers}: must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"--reward-timeout {timeout_s}: must be > 0")
        self.fn_ref = (fn.__module__, fn.__name__)
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context("spawn")  # never fork a process that holds torch/gloo
        self._workers: list[tuple] = []

    def _start_worker(self):
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_loop, args=(child, *self.fn_ref), daemon=True)
        process.start()
        child.close()
        if not parent.poll(self.startup_timeout_s) or parent.recv() != "ready":
            process.kill()
            raise RuntimeError(f"a verifier worker did not start within "
                               f"{self.startup_timeout_s} s")
        return process, parent

    def map(self, calls: list[tuple]) -> tuple[list[float], int, int]:
        """Scores of every call (0 for timeouts and errors), #timeouts, #errors."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())
        scores = [0.0] * len(calls)
        pending = list(range(len(calls)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (job id, deadline)
        timeouts = errors = 0
        while pending or busy:
            for slot in range(self.num_workers):
                if slot not in busy and pending:
                    job = pending.pop()
                    self._workers[slot][1].send((job, calls[job]))
                    busy[slot] = (job, time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, deadline in busy.values())
            ready = wait([self._workers[s][1] for s in busy],
                         timeout=max(0.0, next_deadline - time.monotonic()))
            for slot in list(busy):
                conn = self._workers[slot][1]
                job, deadline = busy[slot]
                if conn in ready:
                    try:
                        _, score, error = conn.recv()
                    except (EOFError, ConnectionError):  # the worker died (crash, OOM kill)
                        score, error = 0.0, "worker died"
                        self._replace(slot)
                    scores[job] = score
                    errors += error is not None
                    del busy[slot]
                elif time.monotonic() >= deadline:
                    timeouts += 1
                    self._replace(slot)
                    del busy[slot]
        return scores, timeouts, errors

    def _replace(self, slot: int) -> None:
        process, conn = self._workers[slot]
        process.kill()
        process.join(timeout=5)
        conn.close()
        self._workers[slot] = self._start_worker()

    def close(self) -> None:
        for process, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
        self._workers = []
