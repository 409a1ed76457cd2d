"""``paced-run``: torchrun whose failures end in one line instead of torchrun's traceback.

It takes torchrun's flags (``paced-run --help`` is torchrun's help) and starts the same elastic
agent (``torch.distributed.run.run``). When a worker fails, torchrun's ``main`` lets
``ChildFailedError`` out through ``@record``, which prints the launcher's own traceback and a
table of every rank (about 40 lines) after the worker's error. ``paced-run`` prints one line
instead: which rank failed, with which exit code or signal, and what that code means, then
exits with that code (a signal N as 128 + N, as a shell reports it). The worker's own error
stays above it: paced-train prints usage and configuration errors in one line, from the first
process of each node. The agent's per-process log lines on a failure ("Sending process ...
closing signal", "failed (exitcode: ...)") say the same and are not printed; without
``OMP_NUM_THREADS`` set it is 1, as torchrun would set it, without torchrun's banner.

    paced-run --nproc-per-node 2 -m megatron_paced.train --config examples/demo.yaml
    paced-run --nnodes 2 --node-rank 0 --master-addr host0 --nproc-per-node 8 \\
        -m megatron_paced.train --config run.yaml
"""

from __future__ import annotations

import logging
import os
import signal
import sys

MEANINGS = {1: "an error; its traceback is above", 2: "a usage or configuration error, above",
            3: "a non-finite loss, above"}
"""What paced-train's exit codes mean (``megatron_paced.train.main``)."""


def failure_line(name: str, failures: dict) -> tuple[str, int]:
    """The line for a failed launch and the exit code to return. ``failures``: global rank ->
    ``ProcessFailure`` (torch.distributed.elastic.multiprocessing.errors). The rank reported is
    the lowest that exited by itself (not one the agent stopped after it), else the first."""
    by_itself = {r: f for r, f in failures.items() if f.exitcode > 0}
    rank = min(by_itself or failures)
    failure = failures[rank]
    others = len(failures) - 1
    tail = f" ({others} other process{'es' if others != 1 else ''} stopped)" if others else ""
    if failure.exitcode < 0:
        number = -failure.exitcode
        try:
            what = signal.Signals(number).name
        except ValueError:
            what = f"signal {number}"
        hint = " (out of memory?)" if number == signal.SIGKILL else ""
        return (f"paced-run: {name} failed: rank {rank} was killed by {what}{hint}{tail}",
                128 + number)
    message = failure.message
    if isinstance(message, dict):  # an error file written by @record
        message = message.get("message", "")
    if failure.error_file == "<N/A>":  # no error file: the message is torch's placeholder
        message = MEANINGS.get(failure.exitcode, "its output is above")
    first = str(message).strip().splitlines()[0] if str(message).strip() else "see above"
    return (f"paced-run: {name} failed: rank {rank} exited with code {failure.exitcode} "
            f"({first}){tail}", failure.exitcode)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(
        logging.CRITICAL)
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        line, code = failure_line(err.name, err.failures)
        print(line, file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
