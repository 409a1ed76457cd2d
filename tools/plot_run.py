"""Draw a run's curves from <save>/metrics.jsonl to PNG: reward, pass@k, calibration.

    python tools/plot_run.py runs/demo                 # writes runs/demo/curves.png
    python tools/plot_run.py runs/paced runs/grpo -o compare.png --x num_samples

Panels: training reward; held-out pass@1 and pass@k; the selected prompts' estimate against
their one observed group (acc_est_mae: mostly that group's binomial noise) and their mean
estimate; the calibration probe (``--calibration-interval``: the estimator's error against
many-sample accuracy with the probe's noise removed, visited and never-visited prompts, and
the raw MAE); and beta * KL(pi_old || pi_theta) after the update (``--kl-interval``).
Several runs share the panels (one line each), x is the step or the completions generated.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_paced.config import FlagParser, description


def load_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"plot_run: {path}: no such file")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl)")
    parser.add_argument("-o", "--output", help="PNG path (default: <first run>/curves.png)")
    parser.add_argument("--x", choices=["step", "num_samples"], default="step")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    axes = grid.flatten()
    axes[5].axis("off")
    for run_dir in args.runs:
        rows = load_metrics(run_dir)
        label = os.path.basename(os.path.normpath(run_dir))

        def series(key):
            points = [(r[args.x], r[key]) for r in rows if key in r]
            return [p[0] for p in points], [p[1] for p in points]

        axes[0].plot(*series("reward_mean"), label=label)
        for key in sorted({k for r in rows for k in r if k.startswith("eval_pass@")}):
            axes[1].plot(*series(key), marker="o", label=f"{label} {key[5:]}")
        axes[2].plot(*series("acc_est_mae"), label=f"{label} |acc_est - one group|")
        axes[2].plot(*series("selected_acc_est_mean"), linestyle="--",
                     label=f"{label} selected acc_est")
        for group, marker in (("visited", "o"), ("unvisited", "s")):
            axes[3].plot(*series(f"calib_{group}_rmse_corrected"), marker=marker,
                         label=f"{label} {group}: RMSE, noise removed")
        axes[3].plot(*series("calib_visited_mae"), marker="o", linestyle=":",
                     label=f"{label} visited: raw MAE")
        axes[4].plot(*series("beta_kl_old_new"), marker=".", label=label)
    titles = ["training reward", "held-out pass@k", "selected prompts: beta * log_z vs one group",
              "calibration probe: beta * log_z vs many-sample accuracy",
              "beta * KL(pi_old || pi_theta) after the update"]
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel(args.x)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    output = args.output or os.path.join(args.runs[0], "curves.png")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
