"""Scorers for the reward-pool tests (importable by spawned worker processes)."""

import os
import time


def slow_when_asked(completion: str, answer: str) -> float:
    """Sleeps for 'sleep' completions, crashes the process for 'crash', raises for 'raise'."""
    if completion == "sleep":
        time.sleep(60)
    if completion == "crash":
        os._exit(3)
    if completion == "raise":
        raise RuntimeError("scorer bug")
    return float(completion == answer)
