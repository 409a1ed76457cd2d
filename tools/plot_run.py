"""Draw a run's curves from <save>/metrics.jsonl to PNG: reward, pass@k, calibration.

    python tools/plot_run.py runs/demo                 # writes runs/demo/curves.png
    python tools/plot_run.py runs/paced runs/grpo -o compare.png --x num_samples

Panels: training reward; held-out pass@1 and pass@k; the accuracy-estimate error
|beta * log_z - observed group accuracy| (acc_est_mae) and the selected prompts' mean estimate.
Several runs share the panels (one line each), x is the step or the completions generated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"plot_run: {path}: no such file")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (holding metrics.jsonl)")
    parser.add_argument("-o", "--output", help="PNG path (default: <first run>/curves.png)")
    parser.add_argument("--x", choices=["step", "num_samples"], default="step")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run_dir in args.runs:
        rows = load_metrics(run_dir)
        label = os.path.basename(os.path.normpath(run_dir))

        def series(key):
            points = [(r[args.x], r[key]) for r in rows if key in r]
            return [p[0] for p in points], [p[1] for p in points]

        axes[0].plot(*series("reward_mean"), label=label)
        for key in sorted({k for r in rows for k in r if k.startswith("eval_pass@")}):
            axes[1].plot(*series(key), marker="o", label=f"{label} {key[5:]}")
        axes[2].plot(*series("acc_est_mae"), label=f"{label} |acc_est - observed|")
        axes[2].plot(*series("selected_acc_est_mean"), linestyle="--",
                     label=f"{label} selected acc_est")
    for axis, title in zip(axes, ["training reward", "held-out pass@k",
                                  "calibration of beta * log_z"]):
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
