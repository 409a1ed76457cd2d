"""tools/plot_run.py draws a PNG from metrics.jsonl files (and says which file is missing)."""

from __future__ import annotations

import json


from tests.conftest import run_python


def test_plot_two_runs(tmp_path):
    for name, slope in (("paced", 0.01), ("grpo", 0.005)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "num_samples": 128 * s, "reward_mean": slope * s,
                 "acc_est_mae": 0.4 - slope * s, "selected_acc_est_mean": 0.5,
                 **({"eval_pass@1": slope * s, "eval_pass@4": 2 * slope * s} if s % 5 == 0
                    else {}),
                 **({"beta_kl_old_new": 1e-3, "calib_visited_mae": 0.1,
                     "calib_visited_rmse_corrected": 0.05, "calib_unvisited_num": 0}
                    if s % 10 == 0 else {})} for s in range(21)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "compare.png"
    result = run_python(
        "-m tools.plot_run", str(tmp_path / "paced"), str(tmp_path / "grpo"), "-o", str(out),
        "--x", "num_samples", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_missing_metrics(tmp_path):
    result = run_python("-m tools.plot_run", str(tmp_path), timeout=120)
    assert result.returncode != 0 and "metrics.jsonl: no such file" in result.stderr
