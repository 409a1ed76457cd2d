"""A run's metrics: one JSON row per step in ``<save>/metrics.jsonl`` (and wandb), the DP
reductions behind them, and the summary printed at the end.

Only global rank 0 writes. On resume, rows after the checkpoint's step are dropped (the
resumed run writes them again), so a resumed run's file equals an uninterrupted run's.

Usage::

    metrics = MetricsLog(save_dir, is_logger=dist.get_rank() == 0)
    metrics.resume_at(step)                   # before the first row
    metrics.start_wandb("project", config)    # optional
    metrics.log(step_record(step, num_samples, rewards, acc_est, losses, ...))
    print_summary(job, metrics.first_eval, history, num_samples)
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from megatron_paced.rl.noise_scale import run_noise_scale


class MetricsLog:
    """metrics.jsonl (and wandb) on the logging rank; nothing elsewhere."""

    def __init__(self, save_dir: str | None, *, is_logger: bool) -> None:
        self.save_dir, self.is_logger = save_dir, is_logger
        self.path = os.path.join(save_dir, "metrics.jsonl") if save_dir else None
        self.wandb = None
        self.first_eval: dict | None = None  # the step-0 evaluation, for the summary

    def resume_at(self, step: int) -> None:
        """Make the folder; drop rows after ``step`` (they will be written again)."""
        if not (self.path and self.is_logger):
            return
        os.makedirs(self.save_dir, exist_ok=True)
        if os.path.isfile(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # a line cut short by a kill: dropped
                        break
                    raise ValueError(f"{self.path}:{number}: not a JSON line; fix or remove "
                                     "it to resume") from None
                if row["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            tmp = f"{self.path}.tmp"  # rewritten whole or not at all
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def start_wandb(self, project: str, config: dict) -> None:
        """``config``: the job's settings; secrets (``*api_key*``) are left out."""
        config = _without_secrets(config)
        if self.is_logger:
            import wandb

            self.wandb = wandb.init(project=project, dir=self.save_dir, config=config,
                                    mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict) -> None:
        if not self.is_logger:
            return
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        """The end of the run: finish the wandb run (its files are complete on disk)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def dp_mean(values: list[float], ctx) -> list[float]:
    """The mean of each value over the DP ranks (collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ctx.dp_group)
    return (t / ctx.dp_size).tolist()


def step_record(step: int, num_samples: int, rewards: torch.Tensor, acc_est: torch.Tensor,
                losses: dict, *, num_replayed: int, step_seconds: float, paced_seconds: float,
                ctx, log_prompt_accuracy: bool = False, rollout_seconds: float = 0.0) -> dict:
    """A step's metrics.jsonl row (collective over DP): this rank's (P, G) ``rewards`` and the
    (P,) ``acc_est`` (beta * log_z before the step's update) of its prompts, averaged over DP;
    ``losses`` from the optimization stage; ``num_replayed`` over all ranks;
    ``rollout_seconds`` the step's time in select -> generate -> score (with --max-staleness,
    mostly the wait for rollouts that did not finish while the step before trained).

    ``acc_est_mae`` is |acc_est - the accuracy of one group of G| on the *selected* prompts:
    mostly that group's binomial noise (0.14 for a perfect estimate at G = 8 under greedy
    selection) and the selection; the estimate's own error is the calibration probe's
    ``calib_visited_rmse_corrected`` (megatron_paced.rl.calibration). ``informative_groups``
    is the share of the step's fresh groups whose rewards differ (those with a GRPO signal;
    the share selection can raise)."""
    acc_obs = rewards.double().mean(dim=1)
    informative = (rewards.max(dim=1).values > rewards.min(dim=1).values).double().mean()
    reward_mean, mae, selected, informative = dp_mean(
        [float(rewards.mean()), float((acc_est - acc_obs).abs().mean()),
         float(acc_est.clamp(0, 1).mean()), float(informative)], ctx)
    record = {"step": step, "num_samples": num_samples, "reward_mean": reward_mean,
              "acc_est_mae": mae, "selected_acc_est_mean": selected,
              "informative_groups": informative, **losses,
              "num_replayed": num_replayed, "step_time_s": step_seconds,
              "rollout_time_s": rollout_seconds, "paced_overhead_s": paced_seconds}
    if log_prompt_accuracy:
        record.update(gather_prompt_accuracy(acc_est, acc_obs, ctx))
    return record


def gather_prompt_accuracy(acc_est: torch.Tensor, acc_obs: torch.Tensor, ctx) -> dict:
    """This step's (acc_est, observed accuracy) of every selected prompt, all DP ranks."""
    pairs = torch.stack([acc_est.double(), acc_obs.double()], dim=1)
    gathered = [torch.empty_like(pairs) for _ in range(ctx.dp_size)]
    dist.all_gather(gathered, pairs, group=ctx.dp_group)
    every = torch.cat(gathered)
    return {"prompt_acc_est": [round(v, 4) for v in every[:, 0].tolist()],
            "prompt_acc_obs": [round(v, 4) for v in every[:, 1].tolist()]}


def print_summary(job, first_eval: dict | None, history: list[dict], num_samples: int) -> None:
    """What the run did: accuracy before and after, samples, calibration of beta * log_z."""
    window = max(1, min(10, len(history) // 3))
    first, last = history[:window], history[-window:]

    def mean(rows, key):
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else float("nan")

    evals = [r for r in ([first_eval] if first_eval else []) + history if "eval_pass@1" in r]
    lines = [f"\n{job.algorithm.algo} run: steps {history[0]['step']}-{history[-1]['step']}, "
             f"{num_samples} completions generated"]
    eval_k = job.eval.eval_k
    k = f"eval_pass@{eval_k}"
    if len(evals) >= 2:
        lines.append(f"  held-out pass@1 {evals[0]['eval_pass@1']:.3f} -> "
                     f"{evals[-1]['eval_pass@1']:.3f}, pass@{eval_k} {evals[0][k]:.3f} -> "
                     f"{evals[-1][k]:.3f}")
    elif evals:
        lines.append(f"  held-out pass@1 {evals[0]['eval_pass@1']:.3f}, pass@{eval_k} "
                     f"{evals[0].get(k, float('nan')):.3f} at step {evals[0]['step']} (the "
                     f"run's only evaluation: --eval-interval {job.eval.eval_interval})")
    lines.append(f"  training reward (first/last {window} steps) {mean(first, 'reward_mean'):.3f}"
                 f" -> {mean(last, 'reward_mean'):.3f}")
    lines.append(f"  |beta*log_z - one observed group| on the selected prompts (first/last "
                 f"{window} steps) {mean(first, 'acc_est_mae'):.3f} -> "
                 f"{mean(last, 'acc_est_mae'):.3f}")
    probes = [r for r in history if r.get("calib_visited_num")]
    if probes:
        probe = probes[-1]
        lines.append(f"  calibration probe at step {probe['step']} ({probe['calib_visited_num']} "
                     f"visited prompts x {job.eval.calibration_samples} samples): "
                     f"beta*log_z error {probe['calib_visited_rmse_corrected']:.3f} RMS (probe "
                     f"noise removed; raw MAE {probe['calib_visited_mae']:.3f}, accuracies "
                     f"spread {probe['calib_visited_acc_std']:.3f})")
    kls = [r["beta_kl_old_new"] for r in history if "beta_kl_old_new" in r]
    if kls:
        lines.append(f"  beta*KL(pi_old || pi_theta) after the update: mean "
                     f"{sum(kls) / len(kls):.1e}, max {max(kls):.1e} over {len(kls)} "
                     f"step{'s' if len(kls) > 1 else ''}")
    noise = run_noise_scale(history)
    if noise:
        scale, batch = noise
        if scale > 0:
            lines.append(f"  gradient noise scale B_simple {scale:.1f} items against a batch "
                         f"of {batch:.0f} (B / B_simple {batch / scale:.2f}: a step makes "
                         f"{1 / (1 + scale / batch):.0%} of the progress of an infinite batch)")
        else:
            lines.append(f"  gradient noise scale not resolved (a negative estimate, "
                         f"{scale:.1f}: too few steps for its noise)")
    save = job.checkpoint.save
    if save:
        lines.append(f"  metrics {os.path.join(save, 'metrics.jsonl')}; checkpoints "
                     f"{save}/iter_*")
    print("\n".join(lines), flush=True)


LOSS_MEANING = {
    "paced": "loss: mean of the TB residual squared, (log Z + log pi_theta - log pi_old - r / "
             "beta)^2; log Z starts at --log-z-init-acc / beta, so a batch of zero rewards reads "
             "(0.5 / beta)^2 (100 at beta 0.05) until log Z learns",
    "flowrl": "loss: FlowRL's importance-weighted TB residual squared (log Z from its ProjZ head)",
    "grpo": "loss: GRPO's clipped surrogate per token (negative: advantage-weighted ratio), plus "
            "its KL term",
}
"""What a step line's ``loss`` means, per --algo (printed once before the first step)."""


class Progress:
    """One line per ``every`` units of a long stage (and at its end) on the logging rank:
    ``label done/total  text  S s/step  ETA E s``, the ETA from the mean time so far."""

    def __init__(self, label: str, total: int, *, start: int = 0, every: int = 1,
                 enabled: bool = True) -> None:
        self.label, self.total, self.start, self.every = label, total, start, max(1, every)
        self.enabled, self.started = enabled, time.perf_counter()

    def tick(self, done: int, text: str = "", seconds: float | None = None) -> None:
        """``seconds``: the time shown per unit (default: the mean so far)."""
        if not self.enabled or (done % self.every and done != self.total):
            return
        mean = (time.perf_counter() - self.started) / max(done - self.start, 1)
        eta = mean * (self.total - done)
        print(f"{self.label} {done:5d}/{self.total}  {text + '  ' if text else ''}"
              f"{mean if seconds is None else seconds:.2f} s/step  ETA {eta:5.0f} s",
              flush=True)


def _without_secrets(config):
    if isinstance(config, dict):
        return {key: _without_secrets(value) for key, value in config.items()
                if "api_key" not in str(key)}
    return config


def staleness_metrics(groups, ctx, rollout_cfg) -> dict:
    """With --max-staleness: the mean and max staleness of the step's trained samples and
    the samples dropped past the bound, over all DP ranks (collective); {} otherwise."""
    if not rollout_cfg.max_staleness:
        return {}
    stats = torch.tensor([float(groups.staleness.sum()), float(groups.staleness.numel())],
                         dtype=torch.float64)
    dist.all_reduce(stats, group=ctx.dp_group)
    worst = groups.staleness.max().reshape(1).double()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.dp_group)
    return {"staleness_mean": float(stats[0] / stats[1]), "staleness_max": float(worst),
            "num_dropped_stale": groups.num_dropped}
