"""The demo job end to end on 2 gloo processes (TP2): it trains and says what it did."""

from __future__ import annotations

import re

import pytest

from megatron_paced.testing.distributed import launch_workers

pytestmark = pytest.mark.distributed


def test_demo_learns_on_tp2():
    result = launch_workers("megatron_paced.demo", nprocs=2, args=[
        "--tensor-model-parallel-size", "2", "--train-iters", "60", "--max-digits", "1",
        "--global-batch-size", "32", "--micro-batch-size", "16", "--num-eval-problems", "64",
        "--log-interval", "20",
    ], timeout_s=300)
    out = result.output
    assert result.returncode == 0, out[-5000:]
    assert "layout  TP2 x PP1 x DP1 on 2 process(es), cpu, gloo" in out
    assert len(re.findall(r"step +\d+/60 +nll/token", out)) == 3
    before, after = map(float, re.search(r"mean answer log-prob (\S+) -> (\S+);", out).groups())
    assert after > before + 3.0, out[-2000:]  # -10.4 -> about -2.5 in 60 steps
    exact_before, exact_after = map(float, re.search(r"all +(\S+) +(\S+)", out).groups())
    assert exact_before == 0.0 and exact_after > 0.1, out[-2000:]
