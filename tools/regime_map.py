"""When prompt selection pays: a table and a plot over benchmark cells of different batch
sizes (``tools/bench_sample_efficiency.py`` runs, one ``--out`` task folder per cell).

For each cell (its prompts per step read from the benchmark's command) and method, from
the cell's ``results.json``:

    saving(method)   = samples_to_target(method) / samples_to_target(GRPO)   (ratio of means;
                       at GRPO's final train accuracy and at half of GRPO's gain)
    share(method)    = (final(method) - final(GRPO)) / (final(oracle) - final(GRPO))
                       (final train_acc_exact at the same samples; 1 is the oracle's gain)
    B / B_noise      = the batch (items the loss counts) over the measured gradient noise
                       scale B_simple (rl/noise_scale.py), pooled over the method's seeds
                       (their S and G^2 summed: one run's estimate is too noisy)

McCandlish et al. 2018: a step of B items makes 1 / (1 + B_noise / B) of an infinite
batch's progress, so making a larger share of the batch informative can pay only while
B is not far above B_noise. The plot draws the oracle's and PACED-RL's sample ratio
against GRPO's B / B_noise.

Usage::

    python tools/regime_map.py runs/map/p4/spread runs/map/p8/spread runs/map/p16/spread \\
        --plot docs/results/regime_map.png
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from megatron_paced.config import FlagParser, description

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.sample_efficiency_runs import METHODS  # noqa: E402


def prompts_per_step(results: dict) -> int:
    """--num-prompts-per-step of the benchmark command that made the cell (16 by default)."""
    words = shlex.split(results.get("command", ""))
    for i, word in enumerate(words[:-1]):
        if word == "--num-prompts-per-step":
            return int(words[i + 1])
    return 16


def mean(entry: dict | None) -> float | None:
    return None if entry is None else entry.get("mean")


def cell_rows(results: dict) -> list[dict]:
    """One row per method of a cell: the figures of this module's docstring."""
    methods = results["methods"]
    by_target = results.get("ratios_to_grpo_by_target_fraction", {})
    final = {m: mean(s.get("final_train_acc")) for m, s in methods.items()}
    gain = (final.get("paced-oracle") - final["grpo"]
            if final.get("paced-oracle") is not None and final.get("grpo") is not None
            else None)
    k_max = max(int(k.split("@")[1]) for k in methods["grpo"]["final"])
    rows = []
    for method, summary in methods.items():
        def saving(fraction):
            entry = by_target.get(fraction, {}).get(method)
            return None if entry is None else entry["of_means"]
        rows.append({
            "prompts_per_step": prompts_per_step(results), "method": method,
            "label": METHODS[method][0], "steps": summary["steps"],
            "seeds": len(summary["seeds"]),
            "samples": mean(summary["samples_total"]), "final_train_acc": final[method],
            "to_final": 1.0 if method == "grpo" else saving("1.0"),
            "to_half": 1.0 if method == "grpo" else saving("0.5"),
            "pairs_final": None if method == "grpo" else  # seeds where both reached it
            len(by_target.get("1.0", {}).get(method, {}).get("per_seed", {}).get("per_seed",
                                                                               [])),
            "share_of_oracle_gain": (None if gain is None or gain <= 0 or final[method] is None
                                     else (final[method] - final["grpo"]) / gain),
            "informative": mean(summary["informative_group_fraction"]),
            f"pass@{k_max}": mean(summary["final"][f"pass@{k_max}"]),
            **noise_of(summary)})
    return rows


def noise_of(summary: dict) -> dict:
    """B_noise and B / B_noise of a method: pooled over its seeds where the cell has it,
    else the mean of the seeds' own."""
    pooled = summary.get("noise_scale_pooled")
    if pooled:
        return {"grad_noise_scale": pooled["grad_noise_scale"],
                "batch_over_noise": pooled["batch_over_noise_scale"]}
    return {"grad_noise_scale": mean(summary.get("grad_noise_scale")),
            "batch_over_noise": mean(summary.get("batch_over_noise_scale"))}


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    pass_key = next(k for k in rows[0] if k.startswith("pass@"))
    lines = ["| prompts / step | method | steps (samples) | seeds | final train acc | to GRPO's "
             "final, x GRPO's samples | to half of GRPO's gain | share of the oracle's final "
             f"gain | informative groups | {pass_key} | B_noise (items) | B / B_noise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pairs = r["pairs_final"]
        note = "" if pairs is None or pairs == r["seeds"] else \
            f" ({pairs}/{r['seeds']} seeds reached)"
        lines.append(
            f"| {r['prompts_per_step']} | {r['label']} | {r['steps']} ({r['samples']:.0f}) "
            f"| {r['seeds']} | {fmt(r['final_train_acc'], 3)} | {fmt(r['to_final'])}{note} "
            f"| {fmt(r['to_half'])} | {fmt(r['share_of_oracle_gain'])} "
            f"| {fmt(r['informative'])} | {fmt(r[pass_key], 3)} "
            f"| {fmt(r['grad_noise_scale'], 0)} | {fmt(r['batch_over_noise'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """Samples to target over GRPO's against GRPO's B / B_noise, per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_of = {r["prompts_per_step"]: r["batch_over_noise"] for r in rows if r["method"] == "grpo"}
    fig, axis = plt.subplots(figsize=(6, 4))
    for method, marker in (("paced-oracle", "o"), ("paced", "s"), ("paced-no-replay", "^")):
        for key, style in (("to_half", "-"), ("to_final", ":")):
            points = sorted((x_of[r["prompts_per_step"]], r[key], r["prompts_per_step"])
                            for r in rows if r["method"] == method and r[key] is not None
                            and x_of.get(r["prompts_per_step"]) is not None)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], style,
                          marker=marker, label=f"{METHODS[method][0]}, "
                          f"{'half of GRPO gain' if key == 'to_half' else 'GRPO final'}")
                for x, y, prompts in points:
                    axis.annotate(str(prompts), (x, y), textcoords="offset points",
                                  xytext=(4, 4), fontsize=7)
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("B / B_noise of GRPO (batch over measured gradient noise scale; "
                    "labels: prompts / step)", fontsize=8)
    axis.set_ylabel("samples to target, x GRPO's")
    axis.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cells", nargs="+", help="benchmark task folders holding results.json")
    parser.add_argument("--plot", default=None, help="PNG of the savings against B / B_noise")
    args = parser.parse_args(argv)
    rows = []
    for cell in args.cells:
        path = os.path.join(cell, "results.json")
        if not os.path.isfile(path):
            parser.error(f"{cell}: no results.json (run tools/bench_sample_efficiency.py "
                         f"--out on it first)")
        with open(path) as f:
            results = json.load(f)
        if "grpo" not in results["methods"]:
            parser.error(f"{path}: has no GRPO runs, the reference of every ratio")
        rows += cell_rows(results)
    rows.sort(key=lambda r: (r["prompts_per_step"], r["method"] != "grpo"))
    print(table(rows))
    if args.plot:
        print(f"\nwrote {plot(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
