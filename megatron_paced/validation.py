"""The start-up checks of a paced-train job: every check that needs no process group, so
that bad input fails before any work, naming the flag, file or line.

:func:`validate_startup` is the one entry (the trainer calls it before it builds anything);
the others are its parts, also used by tools that check a layout without a run.

Usage::

    job = parse_args(["--config", "examples/demo.yaml"])
    startup = validate_startup(job, world_size=2)    # raises ConfigError
    startup.task, startup.resume_step                # the task; the --load iteration or None
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_paced.checkpointing import check_loadable
from megatron_paced.config import ConfigError, require
from megatron_paced.job import AlgorithmConfig, JobConfig, trains_log_z_table
from megatron_paced.losses import check_beta
from megatron_paced.tasks import build_task, check_task_fits_model


def validate_algorithm(algo: AlgorithmConfig, job: JobConfig) -> None:
    """The loss's flags, and the selection and log-Z forms it can work with."""

    check_beta(algo.beta)
    require(algo.flowrl_proj_z_layers >= 1, "flowrl_proj_z_layers", algo.flowrl_proj_z_layers,
            "must be >= 1")
    require(0.0 <= algo.flowrl_proj_z_dropout < 1.0, "flowrl_proj_z_dropout",
            algo.flowrl_proj_z_dropout, "must be in [0, 1)")
    require(math.isfinite(algo.flowrl_reward_scale), "flowrl_reward_scale",
            algo.flowrl_reward_scale, "must be finite")
    require(algo.flowrl_weight_max > 0, "flowrl_weight_max", algo.flowrl_weight_max,
            "must be > 0")
    if trains_log_z_table(algo.algo, algo.flowrl_log_z) or \
            job.selection.acc_estimator != "log-z":
        return
    what = "GRPO" if algo.algo == "grpo" else "FlowRL with --flowrl-log-z proj-z"
    if job.selection.prompt_selection != "uniform":
        raise ConfigError(
            f"--prompt-selection {job.selection.prompt_selection} with --algo {algo.algo}: "
            f"{what} trains no log-Z table, so every estimate stays at --target-acc and the "
            "paced rule would pick the same prompts every step; use --prompt-selection "
            f"uniform (the default for {what})")
    if job.log_z.log_z_param != "table":
        raise ConfigError(f"--log-z-param {job.log_z.log_z_param} with --algo {algo.algo}: "
                          f"{what} trains no PACED log Z; leave --log-z-param at table")


def validate_batch(job: "JobConfig", dp_size: int) -> int:
    """Check the batch arithmetic and the step counts; returns the global batch in sequences."""
    batch, replay, train = job.batch, job.replay, job.train
    validate_algorithm(job.algorithm, job)
    for name in ("num_samples_per_prompt", "num_prompts_per_step", "micro_batch_size"):
        require(getattr(batch, name) >= 1, name, getattr(batch, name), "must be >= 1")
    require(train.train_iters >= 0, "train_iters", train.train_iters, "must be >= 0")
    require(train.train_iters > 0 or (train.sft_warmup_iters > 0 and job.checkpoint.save),
            "train_iters", 0, "runs no RL step: it needs --sft-warmup-iters > 0 and --save (it "
            "writes the warm-started policy as a base checkpoint)")
    require(batch.num_prompts_per_step % dp_size == 0, "num_prompts_per_step",
            batch.num_prompts_per_step, f"must divide by the data-parallel size {dp_size}")
    require(replay.replay_per_step % dp_size == 0, "replay_per_step",
            replay.replay_per_step, f"must divide by the data-parallel size {dp_size}")
    steps = batch.num_steps_per_rollout
    require(steps >= 1, "num_steps_per_rollout", steps, "must be >= 1")
    require((batch.num_prompts_per_step // dp_size) % steps == 0, "num_steps_per_rollout", steps,
            f"must divide the {batch.num_prompts_per_step // dp_size} prompts per data-parallel "
            "rank (each mini-batch holds whole groups)")
    require((replay.replay_per_step // dp_size) % steps == 0, "num_steps_per_rollout", steps,
            f"must divide the {replay.replay_per_step // dp_size} replayed rows per "
            "data-parallel rank (--replay-per-step)")
    total = batch.num_prompts_per_step * batch.num_samples_per_prompt + replay.replay_per_step
    if batch.global_batch_size is not None and batch.global_batch_size != total:
        raise ConfigError(
            f"--global-batch-size {batch.global_batch_size} contradicts --num-prompts-per-step "
            f"{batch.num_prompts_per_step} x --num-samples-per-prompt "
            f"{batch.num_samples_per_prompt} + --replay-per-step {replay.replay_per_step} "
            f"= {total}")
    require((total // dp_size) % batch.micro_batch_size == 0, "micro_batch_size",
            batch.micro_batch_size,
            f"must divide the {total // dp_size} sequences per data-parallel rank "
            f"({total} per step over {dp_size} ranks)")
    if job.selection.acc_estimator == "oracle" or job.eval.eval_train_accuracy:
        name = "acc_estimator" if job.selection.acc_estimator == "oracle" else \
            "eval_train_accuracy"
        require(job.task.task == "arithmetic", name, "oracle",
                f"needs --task arithmetic (one answer string per prompt), not {job.task.task}")
        require(job.sampling.temperature == 1.0 and job.sampling.top_p == 1.0,
                name, "oracle", "reads the accuracy of sampling at --temperature 1 --top-p 1")
    if job.selection.acc_estimator == "oracle":
        require(job.eval.calibration_interval == 0, "calibration_interval",
                job.eval.calibration_interval, "the oracle is exact: nothing to probe (use 0)")
    require(job.eval.eval_k >= 1, "eval_k", job.eval.eval_k, "must be >= 1")
    require(job.eval.eval_final_k >= 0, "eval_final_k", job.eval.eval_final_k, "must be >= 0")
    for name in ("eval_interval", "calibration_interval", "eval_train_interval"):
        require(getattr(job.eval, name) >= 0, name, getattr(job.eval, name), "must be >= 0")
    require(job.logging.grad_noise_scale_interval >= 0, "grad_noise_scale_interval",
            job.logging.grad_noise_scale_interval, "must be >= 0")
    require(job.logging.kl_interval >= 0, "kl_interval", job.logging.kl_interval,
            "must be >= 0")
    require(job.eval.calibration_prompts >= 1, "calibration_prompts",
            job.eval.calibration_prompts, "must be >= 1")
    require(job.eval.calibration_samples >= 2, "calibration_samples",
            job.eval.calibration_samples, "must be >= 2 (the probe's noise estimate divides "
            "by M - 1)")
    require(batch.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds",
            batch.dynamic_sampling_max_rounds, "must be >= 1")
    return total


@dataclass
class Startup:
    """What the start-up checks found."""

    task: object
    """The task (its prompts read and tokenized)."""
    resume_step: int | None
    """The --load iteration to resume from, checked and verified (None: a fresh start)."""


def validate_startup(job: JobConfig, world_size: int) -> Startup:
    """Every check that needs no process group, so bad flags fail before any work; the
    checkpoint of --load is verified here, once (each process hashes its share)."""

    parallel, model_cfg, train_cfg = job.parallel, job.model, job.train
    parallel.validate(world_size=world_size)
    model_cfg.validate(parallel)
    for name in ("task", "data", "optimizer", "log_z", "selection", "replay", "rollout",
                 "sampling", "checkpoint", "eval"):
        getattr(job, name).validate()
    validate_batch(job, parallel.data_parallel_size(world_size))
    resume_step = None
    if job.checkpoint.load:
        resume_step = check_loadable(job.checkpoint.load, model_cfg, train_cfg.params_dtype,
                                     may_be_empty=job.checkpoint.load_is_save())
    task = build_task(job.task, job.data, seed=train_cfg.seed,
                      eval_num_prompts=job.eval.eval_num_prompts)
    try:
        flag = (f"--tokenizer {job.task.tokenizer}" if job.task.tokenizer
                else "the arithmetic task's tokenizer")
        check_task_fits_model(task, model_cfg, job.sampling.max_new_tokens, flag)
        require(job.batch.num_prompts_per_step <= len(task.problems), "num_prompts_per_step",
                job.batch.num_prompts_per_step,
                f"must be <= the {len(task.problems)} training prompts of --task "
                f"{job.task.task}")
        require(not job.batch.dynamic_sampling
                or job.selection.prompt_selection == "uniform", "dynamic_sampling", True,
                "draws fresh prompts each round: it needs --prompt-selection uniform")
        if job.rollout.max_staleness:
            require(not job.batch.dynamic_sampling, "max_staleness", job.rollout.max_staleness,
                    "cannot be combined with --dynamic-sampling (its extra rounds depend on "
                    "the step's own rewards); use 0")
            require(parallel.pipeline_model_parallel_size == 1, "max_staleness",
                    job.rollout.max_staleness,
                    "needs --pipeline-model-parallel-size 1 (the weights of later stages "
                    "are not pushed asynchronously yet); use 0")
        rollout = job.rollout
        if rollout.rollout_backend == "sglang" and rollout.sglang_url and \
                job.sampling.temperature not in (0.0, 1.0) and \
                not rollout.sglang_original_logprobs:
            uses = [flag for flag, on in (
                ("--old-log-probs engine", job.algorithm.anchor_from_engine),
                ("--replay-old-log-probs generation",
                 job.replay.replay_old_log_probs == "generation")) if on]
            require(not uses, "sglang_original_logprobs", False,
                    f"{' and '.join(uses)} at --temperature {job.sampling.temperature} would "
                    "anchor the loss on SGLang's log-probs of the temperature-scaled logits: "
                    "start the --sglang-url servers with SGLANG_RETURN_ORIGINAL_LOGPROB=1 and "
                    "pass --sglang-original-logprobs (or use --old-log-probs recompute)")
        sampling = job.sampling
        if trains_log_z_table(job.algorithm.algo, job.algorithm.flowrl_log_z):
            require(sampling.temperature == 1.0 and sampling.top_p == 1.0, "temperature",
                    sampling.temperature,
                    f"(--top-p {sampling.top_p}) with --algo {job.algorithm.algo}: the loss "
                    "anchors on pi_old's temperature-1 log-probs, and Proposition 4.1 "
                    "(beta * log_z -> the accuracy of pi_old) holds for samples of pi_old "
                    "itself; sample at --temperature 1 --top-p 1")
        if train_cfg.sft_warmup_iters and job.task.task != "arithmetic":
            task.supervised_batch(0, 0, 0)  # raises: no built-in warm start
        if not (resume_step is not None or train_cfg.sft_warmup_iters
                or train_cfg.allow_random_init):
            raise ConfigError(
                "the policy would start from random weights (no --load, --sft-warmup-iters 0), "
                "and RL from random weights learns nothing: start from a checkpoint (--load "
                "DIR, e.g. tools/convert_hf_to_megatron.py output), warm-start the built-in "
                "task (--sft-warmup-iters 1000), or run the demo (--config examples/demo.yaml); "
                "--allow-random-init runs it anyway")
    except ConfigError:
        task.close()
        raise
    return Startup(task, resume_step)
