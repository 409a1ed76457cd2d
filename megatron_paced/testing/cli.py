"""Many command-line runs in one child process: the start-up error tests' harness.

A test that checks what ``paced-train --beta 0`` prints would pay a Python start (2-5 s: torch,
transformers) per case if it ran each as its own command. Here one child process imports each
entry point once and runs every case through the same ``main(argv)`` the console script calls,
with ``sys.exit`` codes, standard output and standard error captured per case, and the case's
environment variables set only while it runs. The pytest process stays pristine (nothing it
runs can switch the CPU compatibility layer on there).

Contract
    * A case is ``CliCase(module, argv, env)``; ``module`` has ``main(argv) -> int``.
    * Its result is ``CliResult(returncode, stdout, stderr)``: ``returncode`` is what
      ``main`` returned or passed to ``sys.exit`` (argparse's errors: 2); an exception that
      escapes ``main`` gives 1 and its traceback in ``stderr``, as ``python -m module`` would.
    * Only for runs that stop before training: a case that starts processes groups or
      threads leaves them behind for the next case.

Usage::

    results = run_cli_cases([CliCase("megatron_paced.train", ["--beta", "0"]),
                             CliCase("megatron_paced.train", ["--target-acc", "1.0"])])
    assert results[0].returncode == 2 and "--beta 0" in results[0].stderr
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class CliCase:
    module: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli_cases(cases: Sequence[CliCase], timeout_s: float = 300) -> list[CliResult]:
    """Run every case in one child Python (in order) and return their results."""
    with tempfile.TemporaryDirectory() as folder:
        request, answer = os.path.join(folder, "cases.json"), os.path.join(folder, "out.json")
        with open(request, "w") as f:
            json.dump([asdict(case) for case in cases], f)
        child = subprocess.run(
            [sys.executable, "-m", "megatron_paced.testing.cli", request, answer],
            capture_output=True, text=True, timeout=timeout_s,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        if child.returncode != 0 or not os.path.exists(answer):
            raise RuntimeError(f"the CLI harness exited with {child.returncode}:\n"
                               f"{child.stderr[-4000:]}")
        with open(answer) as f:
            return [CliResult(**result) for result in json.load(f)]


def _run_one(case: CliCase) -> CliResult:
    saved = {name: os.environ.get(name) for name in case.env}
    os.environ.update(case.env)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = importlib.import_module(case.module).main(list(case.argv))
            except SystemExit as stop:
                returncode = stop.code if isinstance(stop.code, int) else \
                    (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - reported as the command line would report it
                traceback.print_exc()
                returncode = 1
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return CliResult(int(returncode or 0), stdout.getvalue(), stderr.getvalue())


def _main(request: str, answer: str) -> int:
    with open(request) as f:
        cases = [CliCase(**case) for case in json.load(f)]
    results = [asdict(_run_one(case)) for case in cases]
    with open(answer, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
