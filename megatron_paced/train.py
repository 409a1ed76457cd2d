"""paced-train: RL post-training with PACED-RL (or GRPO / FlowRL) on Megatron-Core.

One step, as a straight line (:func:`train_step`)::

    select -> generate -> score -> replay -> old log-probs -> loss -> optimize -> sync -> log

Every rank selects the same prompts (global selection over the sharded log-Z table); each DP
rank generates for its share, scores, offers its samples to the distributed replay, draws its
share of the replayed samples, and trains on the union; gradients meet in Megatron's DDP and
in the log-Z table's all-to-all. Metrics go to ``<save>/metrics.jsonl`` (and wandb), and
checkpoints through ``dist_checkpointing`` (:mod:`megatron_paced.checkpointing`).

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
import functools
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_paced.config import ConfigError
from megatron_paced.job import JobConfig, parse_args, validate_startup
from megatron_paced.models.config import ModelConfig
from megatron_paced.rl.collect import Collector
from megatron_paced.rl.evaluate import evaluate as rl_evaluate
from megatron_paced.rl.metrics import MetricsLog, dp_mean, gather_prompt_accuracy, print_summary
from megatron_paced.rl.optimize import micro_batch_size_for, optimize_step


# Seeds of draws that are not a training step's own (dynamic-sampling rounds: rl/collect.py):
# evaluation after step s samples with seed EVAL_SEED_OFFSET + s, and SFT step i draws its
# batch with seed * SFT_SEED_STRIDE + i.
EVAL_SEED_OFFSET = 10**6
SFT_SEED_STRIDE = 7


# ---------------------------------------------------------------------------------------------
# The run: everything the step needs, built once.
# ---------------------------------------------------------------------------------------------


class Run:
    def __init__(self, job: JobConfig, task=None) -> None:
        from megatron_paced.checkpointing import CheckpointManager
        from megatron_paced.models.policy import build_policy, build_reference
        from megatron_paced.paced.state import PacedState
        from megatron_paced.paced.log_z import build_log_z_table
        from megatron_paced.paced.replay import DistributedReplay
        from megatron_paced.paced.selection import PromptSelector
        from megatron_paced.parallel import initialize_parallel
        from megatron_paced.rollout import build_rollout
        from megatron_paced.rollout.engine import SamplingParams
        from megatron_paced.tasks import build_task

        self.job, self.cfg = job, job.train
        cfg = self.cfg
        if cfg.deterministic_mode:  # before the first CUDA call reads the variables
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            os.environ.setdefault("NCCL_ALGO", "Ring")
            os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE attention
            torch.use_deterministic_algorithms(True)
        self.ctx = initialize_parallel(job.parallel, seed=cfg.seed)
        self.task = task or build_task(job.task, job.data, seed=cfg.seed,
                                       eval_num_prompts=job.eval.eval_num_prompts)
        self.problems, self.eval_problems = self.task.problems, self.task.eval_problems
        self.model_cfg: ModelConfig = job.model
        self.policy = build_policy(self.model_cfg, job.optimizer, self.ctx, seed=cfg.seed,
                                   params_dtype=cfg.params_dtype)
        self.reference = None
        algo = job.algorithm
        if algo.algo == "flowrl" or (algo.algo == "grpo" and algo.grpo_kl_coef > 0):
            self.reference = build_reference(self.model_cfg, self.ctx, seed=cfg.seed,
                                             copy_from=self.policy,
                                             params_dtype=cfg.params_dtype)
        sel, dp = job.selection, self.ctx.dp_group
        self.log_z = build_log_z_table(len(self.problems), job.log_z, beta=job.algorithm.beta,
                                       target_acc=sel.target_acc, dp_group=dp)
        self.selector = PromptSelector(sel, seed=cfg.seed, dp_group=dp)
        self.replay = DistributedReplay(job.replay, num_prompts=len(self.problems),
                                        seed=cfg.seed, dp_group=dp)
        self.checkpoints = CheckpointManager(job.checkpoint.save, job.checkpoint.save_interval,
                                             self.policy,
                                             PacedState(self.log_z, self.selector, self.replay))
        self.seq_length = self.task.max_prompt_tokens + job.sampling.max_new_tokens
        self.rollout = build_rollout(
            job.rollout, model=self.policy.modules(), model_cfg=self.model_cfg, ctx=self.ctx,
            max_sequence_length=self.model_cfg.max_position_embeddings, log_dir=job.checkpoint.save)
        self.sampling = SamplingParams(temperature=job.sampling.temperature,
                                       top_p=job.sampling.top_p,
                                       max_new_tokens=job.sampling.max_new_tokens,
                                       stop_token_ids=self.task.stop_token_ids)
        self.collector = Collector(
            self.task, self.rollout, self.selector, self.log_z, self.sampling, self.ctx,
            num_prompts_per_step=job.batch.num_prompts_per_step,
            num_samples_per_prompt=job.batch.num_samples_per_prompt,
            dynamic_sampling=job.batch.dynamic_sampling,
            dynamic_sampling_max_rounds=job.batch.dynamic_sampling_max_rounds)
        self.step, self.num_samples = 0, 0
        self.paced_seconds = 0.0
        self.metrics = MetricsLog(job.checkpoint.save, is_logger=dist.get_rank() == 0)

    def counters(self) -> dict:
        """What a checkpoint stores beside the weights, optimizer and PACED state."""
        return {"step": self.step, "num_samples": self.num_samples}

    # ---- replay -----------------------------------------------------------------------------
    def replay_step(self, prompt_ids, fresh, rewards, step: int):
        """Offer the scored samples (priority |acc_est - acc_obs|); draw this rank's share."""
        from megatron_paced.paced.replay import offer_and_draw

        start = time.perf_counter()
        acc_before = self.log_z.lookup(prompt_ids).double() * self.job.algorithm.beta
        mine = offer_and_draw(self.replay, prompt_ids, acc_before, fresh, rewards, step=step,
                              version=self.step, dp_rank=self.ctx.dp_rank,
                              dp_size=self.ctx.dp_size)
        self.paced_seconds += time.perf_counter() - start
        return acc_before, rewards.double().mean(dim=1), mine

    def micro_batch_size_for(self, batch) -> int:
        return micro_batch_size_for(batch.num_sequences, self.job.batch.micro_batch_size)

    # ---- batch and old log-probs --------------------------------------------------------------
    def fresh_batch(self, problems, completions):
        """This step's rollouts as padded rows (prompt, sample order)."""
        from megatron_paced.rollout.engine import completions_to_batch

        prompts = [self.task.prompt_tokens(p) for p in problems]
        return completions_to_batch(prompts, completions, self.seq_length)

    def make_batch(self, prompt_ids, fresh, rewards, replayed):
        """Fresh rows + replayed rows, with rewards, advantages, pi_old (and pi_ref)."""
        from megatron_paced.forward_backward import compute_log_probs
        from megatron_paced.rl.batch import build_train_batch

        batch = build_train_batch(prompt_ids, fresh, rewards, replayed)
        extras, num_fresh = batch.extras, fresh.num_sequences
        rollout_lp = extras["old_log_probs"]
        if not self.job.algorithm.use_rollout_logprobs:  # pi_old recomputed by the trainer;
            fresh_rows = batch.rows(0, num_fresh)  # replayed rows keep their generator's
            recomputed = compute_log_probs(self.policy.model, fresh_rows, self.ctx,
                                           vocab_size=self.model_cfg.vocab_size,
                                           micro_batch_size=self.micro_batch_size_for(fresh_rows))
            extras["old_log_probs"] = torch.cat([recomputed.token_log_probs.cpu(),
                                                 rollout_lp[num_fresh:]])
        if self.reference is not None:
            extras["ref_log_probs"] = compute_log_probs(
                self.reference.model, batch, self.ctx, vocab_size=self.model_cfg.vocab_size,
                micro_batch_size=self.micro_batch_size_for(batch)).token_log_probs.cpu()
        return batch

    # ---- loss and optimize ----------------------------------------------------------------------
    def loss_fn(self):
        from megatron_paced import losses

        job = self.job
        if job.algorithm.algo == "paced":
            return functools.partial(losses.paced_loss_fn, beta=job.algorithm.beta)
        if job.algorithm.algo == "flowrl":
            return functools.partial(losses.flowrl_loss_fn, beta=job.algorithm.beta,
                                     clip_eps=job.algorithm.flowrl_clip)
        return functools.partial(losses.grpo_loss_fn, kl_coef=job.algorithm.grpo_kl_coef)

    def optimize(self, batch) -> dict:
        """The optimization stage (:func:`megatron_paced.rl.optimize.optimize_step`)."""
        if self.job.debug.inject_nan_at_step == self.step + 1:  # fault injection (tests)
            batch.extras["rewards"][0] = float("nan")
        result = optimize_step(self.policy, self.log_z, batch, self.loss_fn(), self.ctx,
                               vocab_size=self.model_cfg.vocab_size,
                               micro_batch_size=self.micro_batch_size_for(batch),
                               train_log_z=self.job.algorithm.algo != "grpo", step=self.step + 1,
                               prompt_ids=self.prompt_ids_of)
        self.paced_seconds += result.log_z_seconds
        return result.metrics()

    def prompt_ids_of(self, rows: list[int]) -> list:
        """The dataset prompt ids of log-Z rows."""
        return [getattr(self.problems[row], "prompt_id", row) for row in rows]

    # ---- sync and log -----------------------------------------------------------------------
    def sync(self) -> None:
        self.rollout.sync_weights(self.policy.modules(), self.step)


def train_step(run: Run) -> dict:
    """One RL step; returns its metrics."""
    start, step = time.perf_counter(), run.step + 1
    groups = run.collector.collect(step)                             # select, generate, score
    run.paced_seconds = groups.selection_seconds  # replay and the log-Z step add theirs
    fresh = run.fresh_batch(groups.problems, groups.completions)
    rows, rewards = groups.prompt_rows, groups.rewards
    acc_before, acc_obs, replayed = run.replay_step(rows, fresh, rewards, step)      # replay
    batch = run.make_batch(rows, fresh, rewards, replayed)                           # pi_old
    losses = run.optimize(batch)                                                     # optimize
    run.step, run.num_samples = step, run.num_samples + groups.num_generated
    run.sync()                                                                       # sync
    reward_mean, mae, selected = dp_mean([float(rewards.mean()),                     # log
                                          float((acc_before - acc_obs).abs().mean()),
                                          float(acc_before.clamp(0, 1).mean())], run.ctx)
    record = {"step": step, "num_samples": run.num_samples, "reward_mean": reward_mean,
              "acc_est_mae": mae, "selected_acc_est_mean": selected, **losses,
              "num_replayed": len(replayed) * run.ctx.dp_size,
              "step_time_s": time.perf_counter() - start,
              "paced_overhead_s": run.paced_seconds}
    if run.job.logging.log_prompt_accuracy:
        record.update(gather_prompt_accuracy(acc_before, acc_obs, run.ctx))
    return record


def evaluate(run: Run) -> dict:
    """Held-out pass@k of the current policy (:mod:`megatron_paced.rl.evaluate`)."""
    collector, step = run.collector, run.step + 1  # the step an error would name

    def sample_rewards(problems, n, seed):
        return collector.score(problems, collector.generate(problems, n, seed, step), step)

    return rl_evaluate(run.eval_problems, sample_rewards, eval_k=run.job.eval.eval_k,
                       seed=EVAL_SEED_OFFSET + run.step, ctx=run.ctx)


def sft_warmup(run: Run) -> None:
    """Supervised steps on the reference answers (the base policy of the built-in task)."""
    from megatron_paced.forward_backward import forward_backward
    from megatron_paced.losses import nll_loss

    cfg, job = run.cfg, run.job
    saved_lrs = [group["lr"] for group in run.policy.optimizer.param_groups]
    for group in run.policy.optimizer.param_groups:
        group["lr"] = cfg.sft_lr
    for step in range(cfg.sft_warmup_iters):
        batch = run.task.supervised_batch(job.batch.micro_batch_size * run.ctx.dp_size,
                                          seed=cfg.seed * SFT_SEED_STRIDE + step,
                                          seq_length=run.seq_length)
        run.policy.zero_grad()
        forward_backward(run.policy.model, batch.shard_for_dp(run.ctx.dp_rank, run.ctx.dp_size),
                         nll_loss, run.ctx, vocab_size=run.model_cfg.vocab_size,
                         micro_batch_size=job.batch.micro_batch_size)
        run.policy.step()
    for group, lr in zip(run.policy.optimizer.param_groups, saved_lrs):
        group["lr"] = lr


def train(job: JobConfig, task=None) -> Run:
    from megatron_paced.checkpointing import check_loadable

    cfg = job.train
    run = Run(job, task)
    load = job.checkpoint.load
    if load and check_loadable(load, run.model_cfg, cfg.params_dtype) is not None:
        counters = run.checkpoints.load(job.checkpoint.load)
        run.step = int(counters.get("step", 0))
        run.num_samples = int(counters.get("num_samples", 0))
    if run.step == 0 and cfg.sft_warmup_iters:
        sft_warmup(run)
    if run.reference is not None and cfg.train_iters:
        load_or_save_reference(run)
    run.metrics.resume_at(run.step)
    if job.logging.wandb_project:
        run.metrics.start_wandb(job.logging.wandb_project, dataclasses.asdict(job))
    run.sync()  # SGLang servers start from a checkpoint, not from this policy
    if job.eval.eval_interval and run.step == 0:
        run.metrics.first_eval = {"step": 0, "num_samples": 0, **evaluate(run)}
        run.metrics.log(run.metrics.first_eval)
    if cfg.train_iters == 0:  # the warm start alone: a base policy for RL runs to --load
        return save_base_policy(run)
    history: list[dict] = []
    start_step, started = run.step, time.perf_counter()
    while run.step < cfg.train_iters:
        record = train_step(run)
        if job.eval.eval_interval and run.step % job.eval.eval_interval == 0:
            record.update(evaluate(run))
        run.metrics.log(record)
        history.append(record)
        if run.metrics.is_logger:
            per_step = (time.perf_counter() - started) / (run.step - start_step)
            eta = per_step * (cfg.train_iters - run.step)
            print(f"step {run.step:5d}/{cfg.train_iters}  reward {record['reward_mean']:.3f}  "
                  f"acc_est_mae {record['acc_est_mae']:.3f}  loss {record['loss']:.4f}  "
                  f"{record['step_time_s']:.2f} s/step  ETA {eta:5.0f} s", flush=True)
        run.checkpoints.save_if_due(run.step, run.counters())
        if job.debug.exit_after_step is not None and run.step == job.debug.exit_after_step:
            dist.barrier()
            os._exit(17)
    run.checkpoints.save_final(run.step, run.counters())
    if run.metrics.is_logger and history:
        print_summary(job, run.metrics.first_eval, history, run.num_samples)
    return run


def save_base_policy(run: Run) -> Run:
    """Save the warm-started policy, weights only (--train-iters 0)."""
    from megatron_paced.checkpointing import save_model_checkpoint

    cfg, job = run.cfg, run.job
    save_model_checkpoint(job.checkpoint.save, run.policy.modules()[0], run.model_cfg)
    if run.metrics.is_logger:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in (run.metrics.first_eval or {}).items()
                          if k.startswith("eval_"))
        print(f"base policy after {cfg.sft_warmup_iters} warm-start steps saved in "
              f"{job.checkpoint.save}"
              + (f" ({shown})" if shown else ""), flush=True)
    return run


def load_or_save_reference(run: Run) -> None:
    """The KL reference is the policy at RL step 0 (after --load and the SFT warm start); it is
    saved once as ``<save>/reference`` (weights only) and reloaded from ``<load>/reference``
    when a run resumes."""
    from megatron_paced.checkpointing import (
        check_loadable, iteration_dir, load_model_weights, save_model_checkpoint,
    )

    job = run.job
    if run.step == 0:
        run.reference.copy_from(run.policy)
    else:
        root = os.path.join(job.checkpoint.load, "reference")
        step = check_loadable(root, run.model_cfg) if os.path.isdir(root) else None
        if step is None:
            raise ConfigError(f"--load {job.checkpoint.load!r}: resuming --algo "
                              f"{job.algorithm.algo} needs the KL "
                              f"reference saved at step 0 in {root}")
        load_model_weights(iteration_dir(root, step), run.reference.model[0], run.model_cfg,
                           run.ctx)
    save, load = job.checkpoint.save, job.checkpoint.load
    if save and (run.step == 0 or os.path.abspath(save) != os.path.abspath(load)):
        save_model_checkpoint(os.path.join(save, "reference"), run.reference.model[0],
                              run.model_cfg)


def main(argv: list[str] | None = None) -> int:
    job = parse_args(argv)
    try:
        task = validate_startup(job, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"paced-train: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        train(job, task)
    except FloatingPointError as err:  # every rank stops at the same step
        print(f"paced-train: error: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        task.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
