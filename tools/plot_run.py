"""Draw a run's curves from <save>/metrics.jsonl to PNG: reward, pass@k, the accuracy
estimate, calibration, KL, loss, gradient norm and gradient noise scale.

    python tools/plot_run.py runs/demo                 # writes runs/demo/curves.png
    python tools/plot_run.py runs/paced runs/grpo -o compare.png --x num_samples

Panels (:data:`PANELS`, each with its unit on the y axis): training reward; held-out pass@1
and pass@k; the selected prompts' estimate against their one observed group (acc_est_mae:
mostly that group's binomial noise) and their mean estimate; the calibration probe
(``--calibration-interval``: the estimator's error against many-sample accuracy with the
probe's noise removed, visited and never-visited prompts, and the raw MAE); beta *
KL(pi_old || pi_theta) after the update (``--kl-interval``); the loss; the gradient norm;
the gradient noise scale B_simple (``--grad-noise-scale-interval``). A panel without data in
any run says so and which flag logs it. Several runs share the panels (one line each); x is
the step or the completions generated.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_paced.config import FlagParser, description

# (title, y label, the flag that logs it where it is optional, [(key, legend, style)]);
# a key "eval_pass@*" stands for every pass@k the runs logged.
PANELS = [
    ("training reward", "mean reward of the step's samples", None,
     [("reward_mean", "", "-")]),
    ("held-out pass@k", "pass@k (unbiased, held-out prompts)", "--eval-interval",
     [("eval_pass@*", "", "o-")]),
    ("selected prompts: estimate vs one group", "accuracy (0-1)", None,
     [("acc_est_mae", "|acc_est - one group|", "-"),
      ("selected_acc_est_mean", "mean acc_est", "--")]),
    ("calibration probe: estimate vs many-sample accuracy", "accuracy error (0-1)",
     "--calibration-interval",
     [("calib_visited_rmse_corrected", "visited: RMSE, noise removed", "o-"),
      ("calib_unvisited_rmse_corrected", "unvisited: RMSE, noise removed", "s-"),
      ("calib_visited_mae", "visited: raw MAE", "o:")]),
    ("beta * KL(pi_old || pi_theta) after the update", "nats x beta", "--kl-interval",
     [("beta_kl_old_new", "", ".-")]),
    ("loss", "loss (the algorithm's; see the step line's note)", None, [("loss", "", "-")]),
    ("gradient norm", "L2 norm of the policy gradient (before clipping)", None,
     [("grad_norm", "", "-")]),
    ("gradient noise scale", "B_simple (items the loss counts)", "--grad-noise-scale-interval",
     [("grad_noise_scale", "B_simple", "o-"), ("grad_batch_items", "batch B", "--")]),
]


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

    fig, grid = plt.subplots(3, 3, figsize=(16, 12))
    axes = grid.flatten()
    axes[-1].axis("off")
    runs = {os.path.basename(os.path.normpath(run_dir)): load_metrics(run_dir)
            for run_dir in args.runs}
    for axis, (title, ylabel, flag, lines) in zip(axes, PANELS):
        drawn = 0
        for label, rows in runs.items():
            for key, legend, style in lines:
                keys = (sorted({k for r in rows for k in r if k.startswith("eval_pass@")})
                        if key == "eval_pass@*" else [key])
                for name in keys:
                    points = [(r[args.x], r[name]) for r in rows if name in r]
                    if points:
                        axis.plot(*zip(*points), style, markersize=3,
                                  **({"marker": "o"} if len(points) == 1 and not any(
                                      m in style for m in "o.s") else {}), label=" ".join(
                            part for part in (label if len(runs) > 1 else "", legend,
                                              name[5:] if key == "eval_pass@*" else "")
                            if part) or label)
                        drawn += 1
        axis.set_title(title, fontsize=10)
        axis.set_xlabel({"step": "RL step", "num_samples": "completions generated"}[args.x])
        axis.set_ylabel(ylabel, fontsize=8)
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not in this run" + (f"\n(logged with {flag} N)" if flag else ""),
                      ha="center", va="center", transform=axis.transAxes, color="grey")
    output = args.output or os.path.join(args.runs[0], "curves.png")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
