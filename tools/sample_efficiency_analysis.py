"""The analysis of the sample-efficiency benchmark: ``results.json`` and the plots, from the
finished runs' ``metrics.jsonl`` (pure functions of the metrics, apart from reading them and
saving the plots).

A run (:func:`read_run`) is its ``run.json`` plus ``rows`` (every line of ``metrics.jsonl``),
``curve`` (the rows with a held-out evaluation, ``eval_pass@k``) and ``train_curve`` (the rows
with ``train_acc_exact``). Samples to target: the ``num_samples`` of the first evaluation
whose metric, smoothed by a centered 3-point moving average (:func:`smoothed`, the step-0
value unsmoothed), is >= the target; the target is
``base + target_fraction x (GRPO's final - base)`` unless fixed. Per method, every figure is
:func:`stats` over seeds (mean, sample std, per seed; None for a seed that never reached the
target), and

    ratio = samples_to_target(paced) / samples_to_target(grpo)

of the means and paired by seed, with a 95% t-interval over the pairs (:func:`ratio`).

Usage::

    from tools.sample_efficiency_analysis import analyze, load_runs, plot

    runs = load_runs("runs/bench/add", ["paced", "grpo"])
    results = analyze(runs, None, 0.5, "train_acc_exact")  # results.json's content
    plot("runs/bench/add", results, runs)                   # the three PNGs
"""

from __future__ import annotations

import json
import math
import os

from megatron_paced.rl.noise_scale import run_noise_scale
from tools.sample_efficiency_runs import HAS_LOG_Z, METHODS

def smoothed(values: list[float]) -> list[float]:
    """Centered 3-point moving average (2 points at the end); the first value, the base
    policy's evaluation, is kept as it is."""
    return values[:1] + [sum(values[i - 1:i + 2]) / len(values[i - 1:i + 2])
                         for i in range(1, len(values))]


def first_reaching(curve: list[dict], target: float, metric: str = "eval_pass@1") -> dict | None:
    """The first evaluation whose smoothed pass@1 is >= target (None: never)."""
    accuracy = smoothed([point[metric] for point in curve])
    for point, value in zip(curve, accuracy):
        if value >= target - 1e-12:
            return point
    return None


def stats(values: list[float]) -> dict:
    """Mean and sample std (NaN-free values only), with the values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else None
    std = (math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
           if len(finite) > 1 else 0.0 if finite else None)
    return {"mean": mean, "std": std, "per_seed": values}


def read_run(path: str) -> dict:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(path, "run.json")) as f:
        info = json.load(f)
    return {"rows": rows, "curve": [r for r in rows if "eval_pass@1" in r],
            "train_curve": [r for r in rows if "train_acc_exact" in r], **info}


def final_pass_at(curve: list[dict], key: str, last: int = 3) -> float:
    """Mean of the last ``last`` evaluations (less noise than the final one alone) that have
    ``key`` (pass@k beyond --eval-k: the last evaluation only, --eval-final-k)."""
    values = [point[key] for point in curve[-last:] if key in point]
    return sum(values) / len(values)


def calibration_error(rows: list[dict], tail: float = 0.5) -> float:
    """Mean |beta * log_z - observed group accuracy| over the selected prompts of the last
    ``tail`` of the steps."""
    steps = [r for r in rows if "prompt_acc_est" in r]
    pairs = [(e, o) for r in steps[int(len(steps) * (1 - tail)):]
             for e, o in zip(r["prompt_acc_est"], r["prompt_acc_obs"])]
    return sum(abs(e - o) for e, o in pairs) / len(pairs)


PROBE_GROUPS = ("visited", "unvisited", "heldout")


def probe_error(rows: list[dict], group: str = "visited") -> float | None:
    """The last calibration probe's RMS error of beta * log_z on the group's prompts (visited,
    never visited, held out from training) against their many-sample accuracy, the probe's
    noise removed (None without a probe of that group)."""
    probes = [r for r in rows if r.get(f"calib_{group}_num")]
    return probes[-1][f"calib_{group}_rmse_corrected"] if probes else None


def informative_fraction(rows: list[dict]) -> float:
    """Share of the trained groups whose rewards differ (0 < observed accuracy < 1): the
    groups that carry a GRPO signal, which prompt selection and dynamic sampling aim for."""
    observed = [o for r in rows if "prompt_acc_obs" in r for o in r["prompt_acc_obs"]]
    return sum(0 < o < 1 for o in observed) / len(observed)


def noise_scales(rows: list[dict]) -> tuple[float | None, float | None]:
    """A run's gradient noise scale B_simple (items) and its batch over it, B / B_simple
    (:func:`megatron_paced.rl.noise_scale.run_noise_scale`; None without a log, and the
    ratio None where the estimate is not positive)."""
    pooled = run_noise_scale(rows)
    if pooled is None or not math.isfinite(pooled[0]):
        return None, None
    scale, batch = pooled
    return scale, (batch / scale if scale > 0 else None)


def pooled_noise_scale(runs: list[dict]) -> dict | None:
    """B_simple of all the runs' logs together (sum of S over sum of G^2, every log weighted
    by its steps: one run's estimate is noisy, often negative), and B / B_simple."""
    rows = [row for run in runs for row in run["rows"]]
    pooled = run_noise_scale(rows)
    if pooled is None or not math.isfinite(pooled[0]):
        return None
    scale, batch = pooled
    return {"grad_noise_scale": scale, "batch": batch,
            "batch_over_noise_scale": batch / scale if scale > 0 else None}


def reach(runs: list[dict], target: float, metric: str = "eval_pass@1") -> dict:
    """Samples and steps to the target, per seed (None where never reached)."""
    curve = "train_curve" if metric == "train_acc_exact" else "curve"
    hits = [first_reaching(run[curve], target, metric) for run in runs]
    return {"samples": stats([h["num_samples"] if h else None for h in hits]),
            "steps": stats([h["step"] if h else None for h in hits]),
            "num_reached": sum(h is not None for h in hits), "num_seeds": len(runs)}


# Two-sided 95% quantiles of Student's t by degrees of freedom (1-9), then the normal's.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}


def interval95(summary: dict) -> list[float] | None:
    """The 95% t-interval of a mean from :func:`stats` (None with fewer than 2 values)."""
    values = [v for v in summary["per_seed"] if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return None
    half = T95.get(len(values) - 1, 1.96) * summary["std"] / math.sqrt(len(values))
    return [summary["mean"] - half, summary["mean"] + half]


def ratio(numerator: dict, denominator: dict) -> dict:
    """samples(a) / samples(b): of the means, and per seed (paired by seed: the same seed
    draws the same evaluation prompts) with the paired ratios' mean, std and 95% interval."""
    a, b = numerator["samples"]["per_seed"], denominator["samples"]["per_seed"]
    paired = [x / y for x, y in zip(a, b) if x is not None and y]
    of_means = (numerator["samples"]["mean"] / denominator["samples"]["mean"]
                if numerator["samples"]["mean"] and denominator["samples"]["mean"] else None)
    complete = numerator["num_reached"] == numerator["num_seeds"] and \
        denominator["num_reached"] == denominator["num_seeds"]
    per_seed = stats(paired)
    return {"of_means": of_means, "per_seed": per_seed, "interval95": interval95(per_seed),
            "all_seeds_reached": complete}


def oracle_share(method: dict, uniform: dict, oracle: dict) -> float | None:
    """(uniform - method) / (uniform - oracle) in samples to target (means): 0 is uniform
    selection's cost, 1 the oracle's (None if any never reached it, or if the oracle saves
    nothing over uniform selection: then there is no saving to share)."""
    values = [entry["samples"]["mean"] for entry in (method, uniform, oracle)]
    if any(v is None for v in values) or values[2] >= values[1]:
        return None
    return (values[1] - values[0]) / (values[1] - values[2])


def base_evaluation(runs: list[dict]) -> dict:
    """The base policy's held-out evaluation: every run's step-0 evaluation (the same weights,
    prompts and sampling seed, so they agree; their mean is taken)."""
    firsts = [run["curve"][0] for run in runs if run["curve"][0]["step"] == 0]
    if not firsts:
        raise SystemExit("bench: no run has a step-0 evaluation")
    values = [f["eval_pass@1"] for f in firsts]
    return {key: sum(f[key] for f in firsts) / len(firsts) for key in firsts[0]
            if key.startswith("eval_pass@") or key == "train_acc_exact"} | {
                "num_runs": len(firsts), "spread_pass@1": max(values) - min(values)}


def load_runs(out: str, methods: list[str]) -> dict[str, list[dict]]:
    """The finished runs under ``out``, per method (methods without any left out)."""
    runs = {m: [read_run(os.path.join(out, "runs", m, s)) for s in
                sorted(os.listdir(os.path.join(out, "runs", m)))
                if os.path.isfile(os.path.join(out, "runs", m, s, "run.json"))]
            for m in methods if os.path.isdir(os.path.join(out, "runs", m))}
    return {m: r for m, r in runs.items() if r}


def analyze(runs: dict[str, list[dict]], target_accuracy: float | None,
            target_fraction: float, metric: str = "eval_pass@1") -> dict:
    """results.json's content from the finished runs (:func:`load_runs`)."""
    base = base_evaluation([run for method_runs in runs.values() for run in method_runs])
    ks = sorted(int(k.split("@")[1]) for k in runs[next(iter(runs))][0]["curve"][-1]
                if k.startswith("eval_pass@"))
    reference = "grpo" if "grpo" in runs else next(iter(runs))
    curve = "train_curve" if metric == "train_acc_exact" else "curve"
    reference_final = stats([final_pass_at(r[curve], metric)
                             for r in runs[reference]])["mean"]
    if target_accuracy is None:
        target_accuracy = base[metric] + target_fraction * (reference_final - base[metric])
        rule = (f"{metric}: base + {target_fraction} x ({reference} final - base) = "
                f"{base[metric]:.4f} + {target_fraction} x "
                f"({reference_final:.4f} - {base[metric]:.4f})")
    else:
        rule = "fixed by --target-accuracy"
    results = {"base": base, "target_metric": metric, "target_accuracy": target_accuracy,
               "target_rule": rule,
               "reach_rule": "first evaluation whose held-out pass@1, smoothed by a centered "
                             "3-point moving average over evaluations (step 0 unsmoothed), is "
                             ">= the target",
               "final_rule": "mean of the last 3 evaluations", "methods": {}}
    for method, method_runs in runs.items():
        summary = {"label": METHODS[method][0], "flags": METHODS[method][1],
                   "seeds": [r["seed"] for r in method_runs],
                   "steps": method_runs[0]["steps"],
                   "samples_total": stats([r["rows"][-1]["num_samples"] for r in method_runs]),
                   "to_target": reach(method_runs, target_accuracy, metric),
                   "final": {f"pass@{k}": stats([final_pass_at(r["curve"], f"eval_pass@{k}")
                                                 for r in method_runs]) for k in ks},
                   "final_train_acc": (stats([final_pass_at(r["train_curve"],
                                                            "train_acc_exact")
                                              for r in method_runs])
                                       if method_runs[0]["train_curve"] else None),
                   "calibration_error": (stats([calibration_error(r["rows"])
                                                for r in method_runs])
                                         if method in HAS_LOG_Z else None),
                   **{f"probe_{group}_rmse": (
                       stats([probe_error(r["rows"], group) for r in method_runs])
                       if method in HAS_LOG_Z and all(probe_error(r["rows"], group) is not None
                                                      for r in method_runs) else None)
                      for group in PROBE_GROUPS},
                   "informative_group_fraction": stats([informative_fraction(r["rows"])
                                                        for r in method_runs]),
                   "grad_noise_scale": stats([noise_scales(r["rows"])[0]
                                              for r in method_runs]),
                   "batch_over_noise_scale": stats([noise_scales(r["rows"])[1]
                                                    for r in method_runs]),
                   "noise_scale_pooled": pooled_noise_scale(method_runs),
                   "wall_time_s": stats([r["wall_time_s"] for r in method_runs])}
        results["methods"][method] = summary
    if "paced" in runs and "grpo" in runs:
        results["paced_over_grpo_samples"] = ratio(results["methods"]["paced"]["to_target"],
                                                   results["methods"]["grpo"]["to_target"])
        if "paced-oracle" in runs:
            results["share_of_oracle_gain"] = {
                m: oracle_share(results["methods"][m]["to_target"],
                                results["methods"]["grpo"]["to_target"],
                                results["methods"]["paced-oracle"]["to_target"])
                for m in runs if m not in ("grpo", "paced-oracle")}
        sweep = {}
        for fraction in (0.25, 0.5, 0.75, 1.0):
            target = base[metric] + fraction * (reference_final - base[metric])
            grpo = reach(runs["grpo"], target, metric)
            sweep[str(fraction)] = {"target_accuracy": target,
                                    **{m: ratio(reach(runs[m], target, metric), grpo)
                                       for m in runs if m != "grpo"}}
        results["ratios_to_grpo_by_target_fraction"] = sweep
    return results


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def mean_curve(runs: list[dict], grid: list[float], metric: str = "eval_pass@1"
               ) -> tuple[list[float], list[float]]:
    """The target's metric (held-out pass@1 or train_acc_exact) against samples on a common
    grid: mean and std over seeds."""
    import numpy as np

    curve = "train_curve" if metric == "train_acc_exact" else "curve"
    curves = np.array([np.interp(grid, [p["num_samples"] for p in r[curve]],
                                 [p[metric] for p in r[curve]]) for r in runs])
    return curves.mean(0).tolist(), curves.std(0).tolist()


def plot(out: str, results: dict, runs: dict[str, list[dict]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for method, method_runs in runs.items():
        most = min(r["curve"][-1]["num_samples"] for r in method_runs)
        grid = [most * i / 100 for i in range(101)]
        mean, std = mean_curve(method_runs, grid, results.get("target_metric", "eval_pass@1"))
        axis.plot(grid, mean, label=METHODS[method][0])
        axis.fill_between(grid, [m - s for m, s in zip(mean, std)],
                          [m + s for m, s in zip(mean, std)], alpha=0.15)
    axis.axhline(results["target_accuracy"], color="gray", linestyle="--", label="target")
    axis.set(xlabel="samples (completions generated)",
             ylabel=results.get("target_metric", "eval_pass@1"),
             title="the target's accuracy against samples (mean ± std over seeds)")
    paths.append(_save(fig, axis, os.path.join(out, "accuracy_vs_samples.png")))

    fig, axis = plt.subplots(figsize=(6, 4.5))
    for method, summary in results["methods"].items():
        ks = sorted(int(k.split("@")[1]) for k in summary["final"])
        means = [summary["final"][f"pass@{k}"]["mean"] for k in ks]
        stds = [summary["final"][f"pass@{k}"]["std"] for k in ks]
        axis.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=summary["label"])
    axis.set_xscale("log", base=2)
    axis.set(xlabel="k", ylabel="held-out pass@k (final)", title="pass@k against k")
    paths.append(_save(fig, axis, os.path.join(out, "pass_at_k.png")))

    with_log_z = [m for m in runs if m in HAS_LOG_Z]
    fig, axes = plt.subplots(1, max(1, len(with_log_z)), figsize=(4 * max(1, len(with_log_z)),
                                                                     4), squeeze=False)
    for axis, method in zip(axes[0], with_log_z):
        rows = [r for run in runs[method] for r in run["rows"] if "prompt_acc_est" in r]
        rows = [r for r in rows if r["step"] > runs[method][0]["steps"] // 2]
        estimates = [e for r in rows for e in r["prompt_acc_est"]]
        observed = [o for r in rows for o in r["prompt_acc_obs"]]
        axis.scatter(observed, estimates, s=6, alpha=0.25)
        axis.plot([0, 1], [0, 1], color="gray", linestyle="--")
        axis.set(xlabel="observed group accuracy", ylabel="acc_est = beta * log_z",
                 title=f"{METHODS[method][0]} (2nd half)", xlim=(-0.05, 1.05), ylim=(-0.3, 1.3))
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "calibration.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths + [path]


def _save(fig, axis, path: str) -> str:
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
