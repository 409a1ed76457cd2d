"""paced-train: RL post-training with PACED-RL (or GRPO / FlowRL) on Megatron-Core.

One step, as a straight line (:func:`train_step`)::

    select -> generate -> score -> replay -> old log-probs -> loss -> optimize -> sync -> log

Every rank selects the same prompts (global selection over the sharded log-Z table); each DP
rank generates for its share and scores it; the step draws its replayed samples from what the
earlier steps stored, then offers this step's; each rank trains on its fresh and replayed
rows, all anchored on pi_old; gradients meet in Megatron's DDP and, for the fresh rows only,
in the log-Z table's all-to-all. Each stage is a function of :mod:`megatron_paced.rl` (or
:mod:`megatron_paced.paced`) over the :class:`Trainer`'s components. Every
``--calibration-interval`` steps a probe measures ``beta * log_z`` against many-sample
accuracy. Metrics go to ``<save>/metrics.jsonl`` (and wandb), and checkpoints through
``dist_checkpointing`` (:mod:`megatron_paced.checkpointing`). The :class:`Trainer` is built
once, steps, and is closed at the end (servers stopped, wandb finished, staging removed).

The built-in task (``--task arithmetic``) is multi-digit addition with prompts of 1 to
``--task-max-digits`` digits, so that a tiny model sees every difficulty; ``--sft-warmup-iters``
first teaches it the easy levels.

Usage::

    torchrun --nproc-per-node 2 -m megatron_paced.train --config examples/demo.yaml \\
        --tensor-model-parallel-size 2 --save runs/tp2
    # 100 more steps from its last checkpoint:
    torchrun --nproc-per-node 2 -m megatron_paced.train --config examples/demo.yaml \\
        --tensor-model-parallel-size 2 --save runs/tp2 --load runs/tp2 --train-iters 200

Bare ``paced-train`` (no --load, no --sft-warmup-iters) is refused with a message naming the
flags that make a meaningful run: RL on a random policy earns no reward.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_paced.checkpointing import CheckpointManager, save_model_checkpoint
from megatron_paced.config import ConfigError
from megatron_paced.job import (
    JobConfig,
    as_command_line,
    changed_flags,
    config_yaml,
    parse_args,
    trains_log_z_table,
)
from megatron_paced.losses import nll_loss
from megatron_paced.models.config import ModelConfig
from megatron_paced.models.policy import Policy, Reference, build_policy, build_reference
from megatron_paced.paced.estimator import AccuracyEstimator
from megatron_paced.paced.estimators import BetaPosteriorTable, OracleAccuracy
from megatron_paced.paced.features import set_log_z_features
from megatron_paced.paced.learned_log_z import build_log_z_table
from megatron_paced.paced.log_z import ShardedLogZ
from megatron_paced.paced.replay import DistributedReplay, offer_and_draw
from megatron_paced.paced.selection import PromptSelector
from megatron_paced.paced.state import PacedState
from megatron_paced.parallel import ParallelContext, initialize_parallel
from megatron_paced.rl.batch import build_train_batch
from megatron_paced.rl.calibration import calibration_probe
from megatron_paced.rl.collect import Collector, build_collector
from megatron_paced.rl.evaluate import evaluate as rl_evaluate
from megatron_paced.rl.faults import FaultInjection
from megatron_paced.rl.metrics import (
    LOSS_MEANING,
    MetricsLog,
    Progress,
    print_summary,
    staleness_metrics,
    step_record,
)
from megatron_paced.rl.noise_scale import NoiseScale
from megatron_paced.rl.old_log_probs import attach_old_log_probs, kl_probe
from megatron_paced.rl.optimize import loss_fn_for, optimize_step
from megatron_paced.rl.reference import prepare_reference
from megatron_paced.rollout import RolloutBackend, build_rollout
from megatron_paced.rollout.engine import SamplingParams
from megatron_paced.tasks import Task, build_task
from megatron_paced.validation import Startup, validate_startup

# Seeds of draws that are not a training step's own (dynamic-sampling rounds: rl/collect.py):
# evaluation after step s samples with seed EVAL_SEED_OFFSET + s, and SFT step i draws its
# batch with seed * SFT_SEED_STRIDE + i.
EVAL_SEED_OFFSET = 10**6
SFT_SEED_STRIDE = 7
KL_SEED_OFFSET = 4 * 10**6  # the KL probe's samples of step s: seed KL_SEED_OFFSET + s


@dataclass
class Trainer:
    """The run's components, built once by :func:`build_trainer`, its two counters, and
    :meth:`close` for the end of the run."""

    job: JobConfig
    ctx: ParallelContext
    task: Task
    """The task: problems, eval problems, prompt tokens, verifier (megatron_paced.tasks)."""
    model_cfg: ModelConfig
    policy: Policy
    reference: Reference | None
    """The KL reference (FlowRL, GRPO with --grpo-kl-coef > 0), else None."""
    log_z: ShardedLogZ
    estimator: AccuracyEstimator
    """What selection, replay priorities and the probe read as accuracy (--acc-estimator):
    log_z itself, a Beta posterior table or the oracle (megatron_paced.paced.estimators)."""
    selector: PromptSelector
    replay: DistributedReplay
    rollout: RolloutBackend
    collector: Collector
    loss_fn: Callable
    checkpoints: CheckpointManager
    metrics: MetricsLog
    faults: FaultInjection
    noise: NoiseScale = dataclasses.field(default_factory=NoiseScale)
    """The gradient noise scale's terms since it was last logged."""
    step: int = 0
    num_samples: int = 0
    """Completions generated so far, all DP ranks (what sample efficiency counts)."""

    def counters(self) -> dict:
        """What a checkpoint stores beside the weights, optimizer and PACED state: the
        counters and the rollouts already generated for later steps (--max-staleness;
        collective: it waits for them)."""
        return {"step": self.step, "num_samples": self.num_samples,
                "pending_rollouts": self.collector.pending_state(),
                "noise_scale": self.noise.state_dict()}

    def prompt_ids_of(self, rows: list[int]) -> list:
        """The dataset's stable prompt ids of log-Z rows (what an error names)."""
        return [self.task.problems[row].prompt_id for row in rows]

    def resume(self, step: int) -> None:
        """Load iteration ``step`` of --load (checked and verified at start-up)."""
        load = self.job.checkpoint.load
        counters = self.checkpoints.load(load, step)
        self.step = int(counters.get("step", 0))
        self.num_samples = int(counters.get("num_samples", 0))
        self.noise.load_state_dict(counters.get("noise_scale"))
        self.collector.restore_pending(counters.get("pending_rollouts"), f"--load {load!r}")

    def close(self) -> None:
        """The end of the run: stop the servers it launched, remove its weight staging,
        finish wandb."""
        self.rollout.close()
        self.metrics.close()


def build_trainer(job: JobConfig, task: Task | None = None) -> Trainer:
    """Initialize the process groups and build every component from the job's configs."""
    cfg, algo, sel = job.train, job.algorithm, job.selection
    if cfg.deterministic_mode:  # before the first CUDA call reads the variables
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("NCCL_ALGO", "Ring")
        os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE attention
        torch.use_deterministic_algorithms(True)
    ctx = initialize_parallel(job.parallel, seed=cfg.seed)
    task = task or build_task(job.task, job.data, seed=cfg.seed,
                              eval_num_prompts=job.eval.eval_num_prompts)
    num_prompts = len(task.problems)
    proj_z = algo.algo == "flowrl" and algo.flowrl_log_z == "proj-z"  # FlowRL's own log Z
    micro = job.batch.micro_batch_size
    policy = build_policy(job.model, job.optimizer, ctx, seed=cfg.seed,
                          params_dtype=cfg.params_dtype,
                          proj_z_layers=algo.flowrl_proj_z_layers if proj_z else 0,
                          proj_z_dropout=algo.flowrl_proj_z_dropout, micro_batch_size=micro,
                          record_local_gradients=job.logging.grad_noise_scale_interval > 0)
    reference = None
    if algo.algo == "flowrl" or (algo.algo == "grpo" and algo.grpo_kl_coef > 0):
        reference = build_reference(job.model, ctx, seed=cfg.seed, copy_from=policy,
                                    params_dtype=cfg.params_dtype, micro_batch_size=micro)
    log_z = build_log_z_table(num_prompts, job.log_z, beta=algo.beta,
                              target_acc=sel.target_acc, dp_group=ctx.dp_group,
                              hidden_size=job.model.hidden_size, seed=cfg.seed)
    estimator = build_estimator(sel, log_z, task, policy, ctx, job)
    selector = PromptSelector(sel, seed=cfg.seed, dp_group=ctx.dp_group)
    replay = DistributedReplay(job.replay, num_prompts=num_prompts, seed=cfg.seed,
                               dp_group=ctx.dp_group)
    rollout = build_rollout(
        job.rollout, model=policy.modules(), model_cfg=job.model, ctx=ctx,
        max_sequence_length=job.model.max_position_embeddings, log_dir=job.checkpoint.save)
    sampling = SamplingParams(temperature=job.sampling.temperature, top_p=job.sampling.top_p,
                              max_new_tokens=job.sampling.max_new_tokens,
                              stop_token_ids=task.stop_token_ids)
    collector = build_collector(
        task, rollout, selector, estimator, sampling, ctx,
        num_prompts_per_step=job.batch.num_prompts_per_step,
        num_samples_per_prompt=job.batch.num_samples_per_prompt,
        seq_length=task.max_prompt_tokens + job.sampling.max_new_tokens,
        dynamic_sampling=job.batch.dynamic_sampling,
        dynamic_sampling_max_rounds=job.batch.dynamic_sampling_max_rounds,
        max_staleness=job.rollout.max_staleness)
    checkpoints = CheckpointManager(job.checkpoint.save, job.checkpoint.save_interval, policy,
                                    PacedState(log_z, selector, replay,
                                               None if estimator is log_z else estimator))
    return Trainer(job, ctx, task, job.model, policy, reference, log_z, estimator, selector,
                   replay, rollout, collector, loss_fn_for(algo), checkpoints,
                   MetricsLog(job.checkpoint.save, is_logger=dist.get_rank() == 0),
                   FaultInjection(job.debug))


def build_estimator(sel, log_z, task, policy, ctx, job) -> AccuracyEstimator:
    """--acc-estimator's object: log_z, a Beta posterior table or the oracle."""
    if sel.acc_estimator == "beta-posterior":
        return BetaPosteriorTable(len(task.problems), prior=sel.beta_posterior_prior,
                                  decay=sel.beta_posterior_decay, dp_group=ctx.dp_group)
    if sel.acc_estimator == "oracle":
        return OracleAccuracy(task, policy, ctx, max_new_tokens=job.sampling.max_new_tokens)
    return log_z


def train_step(t: Trainer) -> dict:
    """One RL step on this rank (collective); returns its metrics.jsonl row."""
    start, step, job, ctx = time.perf_counter(), t.step + 1, t.job, t.ctx
    groups = t.collector.collect(step, job.train.train_iters)        # select, generate, score
    rollout_seconds = time.perf_counter() - start  # with --max-staleness: the wait
    rows, rewards = groups.prompt_rows, groups.rewards
    replay_start = time.perf_counter()                               # replay offer/draw
    acc_est = t.estimator.acc_est(rows)  # before this step's update: the replay priority's
    t.estimator.observe(rows, rewards)   # the Beta posterior learns here; log Z by the loss
    replayed = offer_and_draw(t.replay, rows, acc_est, groups.fresh, rewards, step=step,
                              version=t.step - int(groups.staleness.max()),
                              dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                              local_acc_est=t.log_z.owned_acc_est if job.replay.replay_rescore
                              else None)
    replay_seconds = time.perf_counter() - replay_start
    batch = build_train_batch(rows, groups.fresh, rewards, replayed,  # train batch
                              replay_updates_log_z=job.replay.replay_updates_log_z)
    kl_due = bool(job.logging.kl_interval and step % job.logging.kl_interval == 0)
    num_fresh = groups.fresh.num_sequences
    batch, drift = attach_old_log_probs(                             # pi_old
        batch, num_fresh=num_fresh, policy=t.policy, reference=t.reference,
        dp_group=ctx.dp_group, recompute=not job.algorithm.anchor_from_engine,
        recompute_replayed=job.replay.replay_old_log_probs == "recompute", measure_drift=kl_due)
    probe = kl_probe(t.collector, groups.problems, t.policy,  # Prop. 4.1's premise, held out
                     num_samples=job.batch.num_samples_per_prompt,
                     seed=KL_SEED_OFFSET + step, step=step) if kl_due else None
    batch = t.faults.before_optimize(batch, step)
    result = optimize_step(t.policy, t.log_z, batch, t.loss_fn, ctx,  # optimize
                           train_log_z=trains_log_z_table(job.algorithm.algo,
                                                          job.algorithm.flowrl_log_z),
                           step=step, prompt_ids_of=t.prompt_ids_of,
                           num_steps=job.batch.num_steps_per_rollout, num_fresh=num_fresh,
                           group_size=job.batch.num_samples_per_prompt)
    losses = {**result.metrics(), **drift, **staleness_metrics(groups, ctx, job.rollout)}
    for terms in result.noise:                                       # gradient noise scale
        t.noise.add(*terms)
    interval = job.logging.grad_noise_scale_interval
    if interval and step % interval == 0:
        losses.update(t.noise.summary())
    if probe is not None:
        losses["beta_kl_old_new"] = probe.beta_kl(t.policy, dp_group=ctx.dp_group,
                                                  beta=job.algorithm.beta)
    t.step, t.num_samples = step, t.num_samples + groups.num_generated
    t.rollout.sync_weights(t.policy.modules(), step)                 # weight sync
    return step_record(step, t.num_samples, rewards, acc_est, losses,  # metrics
                       num_replayed=len(replayed) * ctx.dp_size,
                       step_seconds=time.perf_counter() - start, rollout_seconds=rollout_seconds,
                       paced_seconds=(groups.selection_seconds + replay_seconds
                                      + result.log_z_seconds),
                       ctx=ctx, log_prompt_accuracy=job.logging.log_prompt_accuracy)


def sample_rewards_of(trainer: Trainer):
    """(problems, n, seed) -> (P, n) rewards of n fresh completions each, not trained on."""
    collector, step = trainer.collector, trainer.step + 1  # the step an error would name

    def sample_rewards(problems, n, seed):
        return collector.score(problems, collector.generate(problems, n, seed, step), step)

    return sample_rewards


def evaluate(trainer: Trainer, eval_k: int | None = None) -> dict:
    """Held-out pass@k of the current policy (:mod:`megatron_paced.rl.evaluate`), k up to
    ``eval_k`` (default --eval-k)."""
    out = rl_evaluate(trainer.task.eval_problems, sample_rewards_of(trainer),
                      eval_k=eval_k or trainer.job.eval.eval_k,
                      seed=EVAL_SEED_OFFSET + trainer.step, ctx=trainer.ctx)
    if trainer.job.eval.eval_train_accuracy:
        out.update(train_accuracy(trainer))
    return out


def train_accuracy(trainer: Trainer) -> dict:
    """``train_acc_exact``: the policy's exact mean accuracy over every training prompt (the
    oracle of megatron_paced.paced.estimators; collective)."""
    oracle = trainer.estimator if trainer.estimator.name == "oracle" else \
        OracleAccuracy(trainer.task, trainer.policy, trainer.ctx,
                       max_new_tokens=trainer.job.sampling.max_new_tokens)
    return {"train_acc_exact": float(oracle.acc_est(
        torch.arange(len(trainer.task.problems))).mean())}


def calibrate(trainer: Trainer) -> dict:
    """The calibration probe of the accuracy estimate (:mod:`megatron_paced.rl.calibration`)."""
    cfg = trainer.job.eval
    return calibration_probe(trainer.estimator, sample_rewards_of(trainer),
                             trainer.task.problems,
                             heldout_problems=trainer.task.eval_problems,
                             num_prompts=cfg.calibration_prompts,
                             num_samples=cfg.calibration_samples, seed=trainer.job.train.seed,
                             step=trainer.step, ctx=trainer.ctx,
                             per_prompt=trainer.job.logging.log_prompt_accuracy)


def sft_warmup(trainer: Trainer) -> None:
    """Supervised steps on the reference answers (the base policy of the built-in task)."""
    cfg, job, ctx, policy = trainer.job.train, trainer.job, trainer.ctx, trainer.policy
    saved_lrs = [group["lr"] for group in policy.optimizer.param_groups]
    for group in policy.optimizer.param_groups:
        group["lr"] = cfg.sft_lr
    progress = Progress("warm start", cfg.sft_warmup_iters, enabled=trainer.metrics.is_logger,
                        every=max(1, cfg.sft_warmup_iters // 10))
    for step in range(cfg.sft_warmup_iters):
        batch = trainer.task.supervised_batch(job.batch.micro_batch_size * ctx.dp_size,
                                              seed=cfg.seed * SFT_SEED_STRIDE + step,
                                              seq_length=trainer.collector.seq_length)
        policy.zero_grad()
        logs = policy.forward_backward(batch.shard_for_dp(ctx.dp_rank, ctx.dp_size), nll_loss)
        policy.step()
        nll = (sum(float(log["nll_sum"]) for log in logs)
               / max(sum(int(log["num_tokens"]) for log in logs), 1)) if logs else None
        progress.tick(step + 1, f"nll/token {nll:.3f}" if nll is not None else "")
    for group, lr in zip(policy.optimizer.param_groups, saved_lrs):
        group["lr"] = lr


def prepare(trainer: Trainer, resume_step: int | None) -> None:
    """Everything before the first RL step: resume, warm start, the KL reference, the
    learned log Z's features, wandb, the servers' first weights, the step-0 evaluation."""
    job, cfg = trainer.job, trainer.job.train
    if resume_step is not None:
        trainer.resume(resume_step)
    if trainer.step == 0 and cfg.sft_warmup_iters:
        sft_warmup(trainer)
    if trainer.reference is not None and cfg.train_iters:
        prepare_reference(trainer.reference, trainer.policy, step=trainer.step,
                          load=job.checkpoint.load, save=job.checkpoint.save,
                          algo=job.algorithm.algo)
    if cfg.train_iters:  # the learned log Z's features, from the policy as it starts RL
        set_log_z_features(trainer.log_z, trainer.task, trainer.policy.model, job=job,
                           model_cfg=trainer.model_cfg, ctx=trainer.ctx, step=trainer.step)
    trainer.metrics.resume_at(trainer.step)
    if job.logging.wandb_project:
        trainer.metrics.start_wandb(job.logging.wandb_project, dataclasses.asdict(job))
    # SGLang servers start from a checkpoint, not from this policy:
    trainer.rollout.sync_weights(trainer.policy.modules(), trainer.step)
    if job.eval.eval_interval and trainer.step == 0:
        trainer.metrics.first_eval = {"step": 0, "num_samples": 0, **evaluate(trainer)}
        trainer.metrics.log(trainer.metrics.first_eval)


def run(trainer: Trainer) -> None:
    """The RL steps to --train-iters, with their evaluations, probes, logs and checkpoints."""
    job, cfg = trainer.job, trainer.job.train
    history: list[dict] = []
    progress = Progress("step", cfg.train_iters, start=trainer.step,
                        enabled=trainer.metrics.is_logger)
    if trainer.metrics.is_logger:
        print(f"(reward: the step's mean training reward; acc_est_mae: |acc estimate - observed "
              f"group accuracy| of the selected prompts; "
              f"{LOSS_MEANING[job.algorithm.algo]})", flush=True)
    while trainer.step < cfg.train_iters:
        record = train_step(trainer)
        last = trainer.step == cfg.train_iters
        if job.eval.eval_interval and trainer.step % job.eval.eval_interval == 0:
            record.update(evaluate(trainer, job.eval.eval_final_k if last else None))
        elif job.eval.eval_train_accuracy and job.eval.eval_train_interval and \
                trainer.step % job.eval.eval_train_interval == 0:
            record.update(train_accuracy(trainer))
        interval = job.eval.calibration_interval
        probed = job.algorithm.algo != "grpo" or trainer.estimator.name != "log-z"
        if interval and trainer.step % interval == 0 and probed:
            record.update(calibrate(trainer))
        trainer.metrics.log(record)
        history.append(record)
        progress.tick(trainer.step, f"reward {record['reward_mean']:.3f}  acc_est_mae "
                      f"{record['acc_est_mae']:.3f}  loss {record['loss']:.4f}",
                      seconds=record["step_time_s"])
        trainer.faults.after_step(trainer.step, trainer.rollout)
        trainer.checkpoints.save_if_due(trainer.step, trainer.counters)
        trainer.faults.after_save(trainer.step)
    trainer.collector.drain()  # the last weight push
    trainer.checkpoints.save_final(trainer.step, trainer.counters)
    if trainer.metrics.is_logger and history:
        print_summary(job, trainer.metrics.first_eval, history, trainer.num_samples)


def train(job: JobConfig, startup: Startup) -> Trainer:
    """Build, prepare and run the job; the trainer is closed at the end, whatever happened.
    ``startup``: what :func:`~megatron_paced.validation.validate_startup` found."""
    trainer = build_trainer(job, startup.task)
    try:
        prepare(trainer, startup.resume_step)
        if job.train.train_iters == 0:  # the warm start alone: a base policy for RL runs
            save_base_policy(trainer)
        else:
            run(trainer)
    finally:
        trainer.close()
    return trainer


def save_base_policy(trainer: Trainer) -> None:
    """Save the warm-started policy, weights only (--train-iters 0)."""
    cfg, job = trainer.job.train, trainer.job
    save_model_checkpoint(job.checkpoint.save, trainer.policy.modules()[0], trainer.model_cfg)
    if trainer.metrics.is_logger:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in (trainer.metrics.first_eval or {}).items()
                          if k.startswith("eval_"))
        print(f"base policy after {cfg.sft_warmup_iters} warm-start steps saved in "
              f"{job.checkpoint.save}"
              + (f" ({shown})" if shown else ""), flush=True)


CONFIG_FILE = "config.yaml"
"""The resolved configuration beside the checkpoints: ``--config`` repeats the run from it."""


def record_config(job: JobConfig, argv: list[str] | None, world_size: int) -> None:
    """Print the layout, the model and the flags that differ from the defaults; save every
    flag's value to ``<--save>/config.yaml`` (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    p, m = job.parallel, job.model
    changed = as_command_line(changed_flags(job, argv))
    print(f"paced-train: {world_size} processes, TP{p.tensor_model_parallel_size} "
          f"PP{p.pipeline_model_parallel_size} DP{p.data_parallel_size(world_size)}; model "
          f"{m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_attention_heads} heads, vocab {m.vocab_size}; --algo {job.algorithm.algo}, "
          f"{job.batch.num_prompts_per_step} prompts x {job.batch.num_samples_per_prompt} "
          f"samples per step", flush=True)
    print(f"  flags that differ from the defaults: {changed or 'none'}", flush=True)
    if job.checkpoint.save:
        os.makedirs(job.checkpoint.save, exist_ok=True)
        path = os.path.join(job.checkpoint.save, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(config_yaml(job))
        os.replace(path + ".tmp", path)
        print(f"  configuration saved: {path} (--config {path} repeats the run)", flush=True)


def usage_error(err: ConfigError) -> int:
    """Print a configuration error once per node (every process of a node finds the same one)
    and return paced-train's exit code for it, 2."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"paced-train: error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    job = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        startup = validate_startup(job, world_size)
    except ConfigError as err:
        return usage_error(err)
    record_config(job, argv, world_size)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        train(job, startup)
    except ConfigError as err:  # found on reading --load, by every rank alike
        return usage_error(err)
    except FloatingPointError as err:  # every rank stops at the same step
        print(f"paced-train: error: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        startup.task.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
