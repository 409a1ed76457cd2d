"""Scorers for the reward-pool tests (importable by spawned worker processes)."""

import os
import time


def slow_when_asked(completion: str, answer: str) -> float:
    """Sleeps for 'sleep' completions (after writing its PID to $SCORER_PID_FILE, if set),
    crashes the process for 'crash', raises for 'raise'."""
    if completion == "sleep":
        if os.environ.get("SCORER_PID_FILE"):
            with open(os.environ["SCORER_PID_FILE"], "w") as f:
                f.write(str(os.getpid()))
        time.sleep(600)
    if completion == "crash":
        os._exit(3)
    if completion == "raise":
        raise RuntimeError("scorer bug")
    return float(completion == answer)
