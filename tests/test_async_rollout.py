"""Asynchronous rollouts (--max-staleness) end to end: paced-train on DP2 with two launched
rollout servers (the project's, SGLang's API) that are slowed down, so that generation lags
training. The staleness bound holds at every step (the trainer waits; nothing is trained past
it); every (prompt, sample) is trained once (num_samples counts each step's groups once); a
server killed mid-flight is restarted, given the weights it held and asked again, and the run
equals the uninterrupted one; so does a run killed after a step and resumed from the
checkpoint before it. Samples tagged past the bound are dropped, counted and generated again.
The same schedule runs on the embedded engine (no server)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers.train_runs import (
    COMMON, free_port, read_metrics, rollout_server_flags, run_train,
)

pytestmark = pytest.mark.distributed

FOUR_STEPS = [*COMMON, "--train-iters", "4"]


def _servers(delay: float, *extra: str, port: int | None = None) -> list[str]:
    """Servers that sample from their requests' seeds (as SGLang with
    --enable-deterministic-inference), so that runs can be compared sample for sample."""
    return rollout_server_flags(f"--enable-deterministic-inference --debug-generate-delay "
                                f"{delay} {' '.join(extra)}", port=port)


def _serving(port: int, within_s: float) -> bool:
    """Whether something still accepts connections on ``port`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def test_bound_exactly_once_server_kill_and_resume_on_dp2(tmp_path):
    """K = 1, DP2, two servers that sleep 0.3 s per request."""
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    servers = ["--max-staleness", "1", "--sglang-num-servers", "2"]
    run_train(FOUR_STEPS + servers + _servers(0.3) + ["--save", str(full)])
    rows = read_metrics(full / "metrics.jsonl", check_order=False)
    assert sorted(rows) == [1, 2, 3, 4]
    # Step 1 trains on the first push's samples (staleness 0), every later step on the
    # weights one step older than pi_old: never more, although generation lags.
    assert [rows[s]["staleness_max"] for s in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [rows[s]["staleness_mean"] for s in rows] == [0.0, 1.0, 1.0, 1.0]
    # Each step's 4 x 4 (prompt, sample) slots trained once; none dropped.
    assert [rows[s]["num_samples"] for s in rows] == [16, 32, 48, 64]
    assert all(rows[s]["num_dropped_stale"] == 0 for s in rows)
    # The anchor's drift: ~0 on fresh weights, the one-step policy change after.
    assert rows[1]["old_logprob_drift_abs"] < 1e-5 < rows[2]["old_logprob_drift_abs"]

    result = run_train(FOUR_STEPS + servers + _servers(0.3) + [
        "--save", str(killed), "--kill-rollout-server-after-step", "2"])
    assert "restarting it (restart 1)" in result.output, result.output[-3000:]
    # Nothing lost, nothing twice.
    assert read_metrics(killed / "metrics.jsonl", check_order=False) == rows

    port = free_port()
    run_train(FOUR_STEPS + servers + _servers(0.3, port=port) + ["--save", str(resumed),
                                                                 "--exit-after-step", "3"],
              expect=17)
    assert (resumed / "latest_checkpointed_iteration.txt").read_text() == "2"
    # The trainer ended without its atexit hooks: its servers notice and exit.
    assert not _serving(port, within_s=10) and not _serving(port + 1, within_s=1)
    run_train(FOUR_STEPS + servers + _servers(0.3) + ["--save", str(resumed), "--load",
                                                      str(resumed)])
    assert read_metrics(resumed / "metrics.jsonl", check_order=False) == rows


def test_samples_past_the_bound_are_dropped_counted_and_regenerated(tmp_path):
    """A server that tags its samples one version older than they are: at K = 1 the samples
    of steps 2 to 4 (weights 0, 1, 2, tagged -1, 0, 1) look two steps stale, so each of their
    groups is dropped (counted) and generated again on the latest weights (tagged one step
    stale). Step 1's (weights 0, tagged -1) look one step stale: kept."""
    save = tmp_path / "lagging"
    run_train(FOUR_STEPS + ["--max-staleness", "1", "--save", str(save)]
              + _servers(0.0, "--debug-weight-version-lag", "1"), nprocs=1)
    rows = read_metrics(save / "metrics.jsonl", check_order=False)
    assert [rows[s]["num_dropped_stale"] for s in rows] == [0, 16, 16, 16]
    # Dropped samples are generated samples too; no trained one is past the bound.
    assert [rows[s]["num_samples"] for s in rows] == [16, 48, 80, 112]
    assert [rows[s]["staleness_max"] for s in rows] == [1.0, 1.0, 1.0, 1.0]


def test_embedded_engine_generates_ahead(tmp_path):
    """K = 2 on the embedded engine (no overlap, the same schedule): step j trains on the
    weights after step j - 3, anchored on them (--old-log-probs engine), with the drift to
    pi_old measured every step (--kl-interval 1)."""
    full = tmp_path / "full"
    run_train(FOUR_STEPS + ["--max-staleness", "2", "--old-log-probs", "engine", "--kl-interval",
                            "1", "--save", str(full)], nprocs=1)
    rows = read_metrics(full / "metrics.jsonl", check_order=False)
    assert [rows[s]["staleness_max"] for s in rows] == [0.0, 1.0, 2.0, 2.0]
    assert [rows[s]["num_samples"] for s in rows] == [16, 32, 48, 64]
    assert rows[1]["old_logprob_drift_abs"] < 1e-5 < rows[3]["old_logprob_drift_abs"]
    assert abs(rows[1]["kl_old_theta"]) < 1e-5  # the engine's anchor is pi_old at step 1
