"""Steps per second of asynchronous rollouts (--max-staleness K) against the synchronous step.

One base policy (the demo task's SFT warm start), then one ``paced-train`` run per K from it,
each as two processes of one thread: the trainer (world size 1) and the rollout server it
launches (``python -m megatron_paced.rollout.serve``, SGLang's HTTP API, weights pushed by
``--weight-sync tensor``). With K = 0 the trainer waits for generation and the server for
the trainer; with K >= 1 they overlap. Prints a table (steps/s and the ratio to K = 0, the
time per step, the staleness logged, the train/inference drift of the anchor) and writes it
to ``OUT/results.json``. Timings skip the first ``--warmup-steps`` steps (the pipeline fills).

Usage::

    python tools/bench_async.py --out runs/bench_async                 # K = 0, 1, 2
    python tools/bench_async.py --out runs/bench_async --staleness 0 1 --steps 40
    python tools/bench_async.py --out runs/bench_async_engine --base runs/bench_async/base \
        --train-args "--old-log-probs engine"                          # no recompute pass

The overlap can save at most the shorter of generation and training: the ratio is bounded
by (generation + training) / max(generation, training), read off the K = 0 row (its
"of which rollouts" column is the generation).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time

from megatron_paced.config import FlagParser, description

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "max_position_embeddings")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], log_path: str) -> float:
    """Run with one thread per process; returns seconds; exits naming the log on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=REPO).returncode
    if code:
        raise SystemExit(f"bench_async: exit {code}; see {log_path}")
    return time.perf_counter() - start


def train_command(args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=1", "-m", "megatron_paced.train", "--config", args.config,
            "--eval-interval", "0", "--calibration-interval", "0", "--save-interval", "0",
            *extra]


def server_flags(base: str) -> str:
    """The rollout server's model flags, from the base checkpoint's model_config.json."""
    with open(os.path.join(base, "iter_0000000", "model_config.json")) as f:
        cfg = json.load(f)
    shape = " ".join(f"--{name.replace('_', '-')} {cfg[name]}" for name in SHAPE_FIELDS)
    return f"{shape} --max-sequence-length {cfg['max_position_embeddings']}"


def summarize(rows: list[dict], warmup: int) -> dict:
    """Steps/s and the means over the steps after the warm-up (pure)."""
    timed = [r for r in rows if r["step"] > warmup]
    seconds = sum(r["step_time_s"] for r in timed)

    def mean(key: str) -> float | None:
        values = [r[key] for r in timed if key in r]
        return sum(values) / len(values) if values else None

    return {"steps_timed": len(timed), "seconds": seconds,
            "steps_per_s": len(timed) / seconds if seconds else None,
            "staleness_mean": mean("staleness_mean"),
            "staleness_max": max((r.get("staleness_max", 0.0) for r in timed), default=None),
            "num_dropped_stale": sum(r.get("num_dropped_stale", 0) for r in timed),
            "old_logprob_drift_abs": mean("old_logprob_drift_abs"),
            "old_logprob_drift_kl": mean("old_logprob_drift_kl"),
            "reward_mean": mean("reward_mean"), "rollout_time_s": mean("rollout_time_s")}


def table(results: dict) -> str:
    sync = results.get("0", {}).get("steps_per_s")
    lines = ["| --max-staleness | steps/s | s/step | of which rollouts | vs K=0 "
             "| staleness mean / max | dropped | drift |logp| per token | reward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in sorted(results.items(), key=lambda item: int(item[0])):
        ratio = f"{r['steps_per_s'] / sync:.2f}x" if sync else "-"
        lines.append(f"| {k} | {r['steps_per_s']:.3f} | {1 / r['steps_per_s']:.3f} "
                     f"| {r['rollout_time_s']:.3f} | {ratio} "
                     f"| {r['staleness_mean'] or 0:.2f} / {r['staleness_max'] or 0:.0f} "
                     f"| {r['num_dropped_stale']} | {r['old_logprob_drift_abs']:.2e} "
                     f"| {r['reward_mean']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="examples/demo.yaml")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--weight-sync", default="tensor", choices=["tensor", "disk"])
    parser.add_argument("--train-args", default="", help="more paced-train flags")
    parser.add_argument("--base", help="the base policy (default OUT/base, made if missing)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps}")
    os.makedirs(args.out, exist_ok=True)
    base = args.base or os.path.join(args.out, "base")
    if not os.path.isfile(os.path.join(base, "latest_checkpointed_iteration.txt")):
        print("base policy (the demo's SFT warm start) ...", flush=True)
        seconds = run(train_command(args, "--train-iters", "0", "--save", base),
                      os.path.join(args.out, "base.log"))
        print(f"  {seconds:.0f} s", flush=True)
    server = shlex.join([sys.executable, "-m", "megatron_paced.rollout.serve"])
    results = {}
    for k in args.staleness:
        save = os.path.join(args.out, f"staleness{k}")
        command = train_command(
            args, "--load", base, "--sft-warmup-iters", "0", "--train-iters", str(args.steps),
            "--save", save,
            "--rollout-backend", "sglang", "--sglang-launch-command", server,
            "--sglang-server-args", server_flags(base), "--sglang-base-port", str(free_port()),
            "--weight-sync", args.weight_sync, "--max-staleness", str(k),
            *shlex.split(args.train_args))
        if os.path.isdir(save):
            import shutil

            shutil.rmtree(save)
        seconds = run(command, os.path.join(args.out, f"staleness{k}.log"))
        with open(os.path.join(save, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        results[str(k)] = {**summarize(rows, args.warmup_steps), "wall_s": seconds,
                           "command": shlex.join(command)}
        print(f"  --max-staleness {k}: {results[str(k)]['steps_per_s']:.3f} steps/s "
              f"({seconds:.0f} s in all)", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
