"""A harness for multi-process tests on gloo: one ``torchrun`` launch, many checks.

A launch costs 6-20 s on a 2-core machine (Megatron-Core takes ~5 s to import per process),
so a distributed test module launches one worker a few times and runs many checks inside.
The worker records each check with :class:`CheckRecorder` (a check fails if it fails on any
rank) and may save tensors for the test process to compare; the test process launches it
with :func:`launch_workers` and reads the results back.

Worker side::

    checks = CheckRecorder()
    with checks.check("logprobs_match_log_softmax[tp2]"):
        torch.testing.assert_close(ours, reference)
    checks.write(out_dir / "checks.json")          # collective: call on every rank

Test side::

    result = launch_workers("tests.distributed.worker", nprocs=4, args=["--out", str(tmp)])
    checks = read_checks(tmp / "checks.json")
    assert checks["logprobs_match_log_softmax[tp2]"]["ok"], checks[...]["error"]
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch.distributed as dist


@dataclass
class LaunchResult:
    returncode: int
    output: str
    seconds: float


def launch_workers(
    module: str,
    *,
    nprocs: int,
    args: Sequence[str] = (),
    timeout_s: float = 900,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> LaunchResult:
    """Run ``python -m module args`` on ``nprocs`` local processes with torchrun (gloo on CPU).

    Each process is limited to one intra-op thread: the ranks share the machine's cores, and
    oversubscription makes a 2-core run many times slower. The launch runs in its own process
    session with its output in a file, and the session is killed when torchrun returns, so
    helpers a killed rank left behind (Megatron's checkpoint writer spawns some) can neither
    hang the caller nor outlive the test.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nprocs}", "-m", module, *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TORCHELASTIC_ERROR_FILE": "", **(env or {})}
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                cwd=cwd, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.seek(0)
        output = log.read()
    return LaunchResult(returncode, output, time.perf_counter() - start)


class CheckRecorder:
    """Records named pass/fail checks in a worker; merges them over ranks on ``write``."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        """Run the body as one named check; an exception fails it and is recorded."""
        try:
            yield
        except Exception:  # noqa: BLE001 - any failure of the body is the check's failure
            rank = dist.get_rank() if dist.is_initialized() else 0
            self.results[name] = {"ok": False, "error": f"rank {rank}: {traceback.format_exc()}"}
        else:
            self.results.setdefault(name, {"ok": True, "error": ""})

    def write(self, path: str | os.PathLike) -> None:
        """Gather every rank's results to global rank 0 and write them as JSON there."""
        gathered: list[dict | None] = [self.results]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.results)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        merged: dict[str, dict] = {}
        for results in gathered:
            for name, result in (results or {}).items():
                if name not in merged or not result["ok"]:
                    merged[name] = result
        Path(path).write_text(json.dumps(merged, indent=1, sort_keys=True))


def launch_and_read_checks(module: str, *, nprocs: int, out: str | os.PathLike,
                           checks_file: str = "checks.json", timeout_s: float = 900,
                           args: Sequence[str] = ()) -> dict[str, dict]:
    """Launch a worker that takes ``--out DIR`` and return the checks it wrote there; a failed
    launch raises with the end of its output."""
    result = launch_workers(module, nprocs=nprocs, args=["--out", str(out), *args],
                            timeout_s=timeout_s)
    if result.returncode != 0:
        raise AssertionError(f"{module} exited with {result.returncode}:\n{result.output[-6000:]}")
    return read_checks(Path(out) / checks_file)


def read_checks(path: str | os.PathLike) -> dict[str, dict]:
    """The merged check results a worker wrote."""
    return json.loads(Path(path).read_text())
