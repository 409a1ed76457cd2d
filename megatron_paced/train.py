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

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from megatron_paced.config import (
    ConfigError,
    OptimizerConfig,
    ParallelConfig,
    add_flags,
    from_args,
    require,
)
from megatron_paced.data import DataConfig
from megatron_paced.models.config import ModelConfig
from megatron_paced.paced.log_z import LogZConfig
from megatron_paced.paced.replay import ReplayConfig
from megatron_paced.paced.selection import SelectionConfig
from megatron_paced.rollout import RolloutConfig
from megatron_paced.tasks import TaskConfig


@dataclass
class TrainConfig:
    """The RL job."""

    algo: Literal["paced", "grpo", "flowrl"] = "paced"
    """Loss: paced (TB against pi_old + log-Z), grpo, or flowrl (TB against pi_ref)."""
    beta: float = 0.05
    """KL coefficient; rewards enter the TB losses as r / beta."""
    num_samples_per_prompt: int = 8
    """G: completions per selected prompt."""
    num_prompts_per_step: int = 16
    """Prompts selected per step (over all DP ranks)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one rank."""
    global_batch_size: Optional[int] = None
    """Sequences per step; must equal prompts x samples + --replay-per-step if given."""
    train_iters: int = 100
    """RL steps (0: only the SFT warm start, written to --save as a model-only checkpoint that
    --load starts RL runs from, the common base policy of a comparison)."""
    seed: int = 1234
    """Seed of weights, selection, sampling and data."""
    deterministic_mode: bool = False
    """As Megatron's --deterministic-mode: torch's deterministic algorithms (with
    CUBLAS_WORKSPACE_CONFIG, NCCL's ring algorithm and TE's deterministic attention), so that a GPU run and its resumption
    repeat bit for bit; slower. CPU runs are deterministic without it."""
    bf16: bool = False
    """bf16 mixed precision, as Megatron's --bf16: bf16 weights and activations, fp32 gradients
    and fp32 main weights in the optimizer (what GPUs train with; fp32 without it)."""
    save: Optional[str] = None
    """Folder of checkpoints and metrics.jsonl."""
    load: Optional[str] = None
    """Checkpoint folder to resume from (the latest iteration in it)."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end, if --save)."""
    eval_interval: int = 0
    """Evaluate pass@1 / pass@k every this many steps (0: never)."""
    eval_num_prompts: int = 64
    """Held-out prompts per evaluation."""
    eval_k: int = 4
    """Samples per held-out prompt (pass@k)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts."""
    max_new_tokens: int = 16
    """Longest completion."""
    sft_warmup_iters: int = 0
    """Supervised steps on the task's answers before RL (the base policy)."""
    sft_lr: float = 3e-3
    """Learning rate of the supervised warm start."""
    allow_random_init: bool = False
    """Run RL on a randomly initialized policy (no --load, no --sft-warmup-iters). Such a policy
    almost never earns a reward, so RL learns nothing; without this flag the run is refused."""
    grpo_kl_coef: float = 0.0
    """GRPO's k3 KL coefficient to the reference (0: no reference model)."""
    flowrl_clip: float = 0.2
    """FlowRL's importance-weight clip."""
    dynamic_sampling: bool = False
    """DAPO-style dynamic sampling (a GRPO baseline): draw more rounds of prompts until the step
    has --num-prompts-per-step groups whose rewards differ; every completion generated counts
    in num_samples. Needs --prompt-selection uniform."""
    dynamic_sampling_max_rounds: int = 4
    """Most rounds of dynamic sampling per step (then groups with equal rewards fill in)."""
    use_rollout_logprobs: bool = False
    """pi_old from the rollout engine instead of a trainer recompute."""
    log_prompt_accuracy: bool = False
    """Also log each step's per-prompt acc_est (beta * log_z) and observed group accuracy
    (for calibration plots)."""
    wandb_project: Optional[str] = None
    """Also log to this wandb project (offline without network)."""
    exit_after_step: Optional[int] = None
    """Testing aid: exit with code 17 right after this step, as if killed."""
    inject_nan_at_step: Optional[int] = None
    """Fault injection: one reward in this step's loss becomes NaN (the run must stop)."""

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def validate(self, dp_size: int, replay: ReplayConfig) -> int:
        """Check the batch arithmetic; returns the global batch in sequences."""
        from megatron_paced.losses import check_beta

        check_beta(self.beta)
        for name in ("num_samples_per_prompt", "num_prompts_per_step", "micro_batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.train_iters >= 0, "train_iters", self.train_iters, "must be >= 0")
        require(self.train_iters > 0 or (self.sft_warmup_iters > 0 and self.save), "train_iters",
                0, "runs no RL step: it needs --sft-warmup-iters > 0 and --save (it writes the "
                "warm-started policy as a base checkpoint)")
        require(self.num_prompts_per_step % dp_size == 0, "num_prompts_per_step",
                self.num_prompts_per_step, f"must divide by the data-parallel size {dp_size}")
        require(replay.replay_per_step % dp_size == 0, "replay_per_step",
                replay.replay_per_step, f"must divide by the data-parallel size {dp_size}")
        total = self.num_prompts_per_step * self.num_samples_per_prompt + replay.replay_per_step
        if self.global_batch_size is not None and self.global_batch_size != total:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} contradicts --num-prompts-per-step "
                f"{self.num_prompts_per_step} x --num-samples-per-prompt "
                f"{self.num_samples_per_prompt} + --replay-per-step {replay.replay_per_step} "
                f"= {total}")
        require((total // dp_size) % self.micro_batch_size == 0, "micro_batch_size",
                self.micro_batch_size,
                f"must divide the {total // dp_size} sequences per data-parallel rank "
                f"({total} per step over {dp_size} ranks)")
        require(self.eval_k >= 1, "eval_k", self.eval_k, "must be >= 1")
        require(self.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds",
                self.dynamic_sampling_max_rounds, "must be >= 1")
        return total


TINY_MODEL = ModelConfig(architecture="llama", num_layers=4, hidden_size=128, ffn_hidden_size=384,
                         num_attention_heads=4, num_query_groups=2, max_position_embeddings=64)
CONFIGS = {"train": TrainConfig, "task": TaskConfig, "data": DataConfig,
           "parallel": ParallelConfig, "model": ModelConfig,
           "optimizer": OptimizerConfig, "log_z": LogZConfig, "selection": SelectionConfig,
           "replay": ReplayConfig, "rollout": RolloutConfig}


def parse_args(argv: list[str] | None = None) -> dict:
    """Flags. Defaults come, in rising order, from the tiny built-in model, ``--model PRESET``
    or ``--hf-config config.json``, then ``--config FILE.yaml`` (unknown keys are an error),
    then the command line."""
    from megatron_paced.models.config import resolve_model_config
    from megatron_paced.tasks.arithmetic import CharTokenizer

    parser = argparse.ArgumentParser(prog="paced-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file of flag values (flag names, - or _)")
    parser.add_argument("--model", help="model preset whose shape sets the model flags' "
                        "defaults (see megatron_paced.models.config.PRESETS)")
    parser.add_argument("--hf-config", help="Hugging Face config.json (or its folder) whose "
                        "shape sets the model flags' defaults")
    for title, cls in CONFIGS.items():
        add_flags(parser, cls, title)
    parser.set_defaults(**vars(TINY_MODEL.replace(vocab_size=CharTokenizer().vocab_size)),
                        lr=1e-3, weight_decay=0.0, replay_per_step=0)
    pre, _ = parser.parse_known_args(argv)
    values: dict = {}
    if pre.config:
        import yaml

        with open(pre.config) as f:
            values = {str(k).replace("-", "_"): v for k, v in (yaml.safe_load(f) or {}).items()}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {pre.config}: unknown keys {unknown}")
    model, hf_config = pre.model or values.get("model"), pre.hf_config or values.get("hf_config")
    if model or hf_config:
        try:
            parser.set_defaults(**vars(resolve_model_config(model, hf_config)))
        except (ConfigError, OSError, ValueError) as err:
            parser.error(str(err))
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    return {title: from_args(cls, args) for title, cls in CONFIGS.items()}


# ---------------------------------------------------------------------------------------------
# The run: everything the step needs, built once.
# ---------------------------------------------------------------------------------------------


class Run:
    def __init__(self, cfgs: dict, task=None) -> None:
        from megatron_paced.models.policy import build_policy, build_reference
        from megatron_paced.paced.log_z import build_log_z_table
        from megatron_paced.paced.replay import DistributedReplay
        from megatron_paced.paced.selection import PromptSelector
        from megatron_paced.parallel import initialize_parallel
        from megatron_paced.rollout import build_rollout
        from megatron_paced.rollout.engine import SamplingParams
        from megatron_paced.tasks import build_task

        self.cfg: TrainConfig = cfgs["train"]
        cfg = self.cfg
        if cfg.deterministic_mode:  # before the first CUDA call reads the variables
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            os.environ.setdefault("NCCL_ALGO", "Ring")
            os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE attention
            torch.use_deterministic_algorithms(True)
        self.ctx = initialize_parallel(cfgs["parallel"], seed=cfg.seed)
        self.task = task or build_task(cfgs["task"], cfgs["data"], seed=cfg.seed,
                                       eval_num_prompts=cfg.eval_num_prompts)
        self.problems, self.eval_problems = self.task.problems, self.task.eval_problems
        self.model_cfg: ModelConfig = cfgs["model"]
        self.policy = build_policy(self.model_cfg, cfgs["optimizer"], self.ctx, seed=cfg.seed,
                                   params_dtype=cfg.params_dtype)
        self.reference = None
        if cfg.algo == "flowrl" or (cfg.algo == "grpo" and cfg.grpo_kl_coef > 0):
            self.reference = build_reference(self.model_cfg, self.ctx, seed=cfg.seed,
                                             copy_from=self.policy,
                                             params_dtype=cfg.params_dtype)
        sel, dp = cfgs["selection"], self.ctx.dp_group
        self.log_z = build_log_z_table(len(self.problems), cfgs["log_z"], beta=cfg.beta,
                                       target_acc=sel.target_acc, dp_group=dp)
        self.selector = PromptSelector(sel, seed=cfg.seed, dp_group=dp)
        self.replay = DistributedReplay(cfgs["replay"], num_prompts=len(self.problems),
                                        seed=cfg.seed, dp_group=dp)
        self.seq_length = self.task.max_prompt_tokens + cfg.max_new_tokens
        self.rollout, self.weight_sync = build_rollout(
            cfgs["rollout"], model=self.policy.modules(), model_cfg=self.model_cfg, ctx=self.ctx,
            max_sequence_length=self.model_cfg.max_position_embeddings, log_dir=cfg.save)
        self.sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens,
                                       stop_token_ids=self.task.stop_token_ids)
        self.step, self.num_samples = 0, 0
        self.paced_seconds = 0.0
        self.metrics_path = os.path.join(cfg.save, "metrics.jsonl") if cfg.save else None
        self.wandb = None
        self.first_eval: dict | None = None  # the step-0 evaluation, for the summary

    @property
    def paced_state(self):
        return (self.log_z, self.selector, self.replay)

    def is_logger(self) -> bool:
        return dist.get_rank() == 0

    # ---- select -----------------------------------------------------------------------------
    def select(self, step: int) -> torch.Tensor:
        """This DP rank's share of the globally selected prompts."""
        start = time.perf_counter()
        chosen = self.selector.select(self.log_z, self.cfg.num_prompts_per_step, step)
        per_rank = len(chosen) // self.ctx.dp_size
        self.paced_seconds += time.perf_counter() - start
        return chosen[self.ctx.dp_rank * per_rank:(self.ctx.dp_rank + 1) * per_rank]

    def select_generate_score(self, step: int):
        """select -> generate -> score: this rank's prompt ids, problems, completions and (P, G)
        rewards, and the completions generated on all ranks. With --dynamic-sampling, rounds
        of fresh prompts follow until every rank has its share of groups whose rewards differ
        (the others carry no GRPO signal); round 0 is the plain step."""
        cfg, per_rank = self.cfg, self.cfg.num_prompts_per_step // self.ctx.dp_size
        rounds = cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1
        collected, num_informative, num_generated = [], 0, 0
        for round_index in range(rounds):
            key = step + round_index * 1_000_003  # round 0: the step's own selection and seed
            prompt_ids = self.select(key)
            problems = [self.problems[int(i)] for i in prompt_ids]
            completions = self.generate(problems, cfg.num_samples_per_prompt, seed=key)
            rewards = self.score(problems, completions)
            num_generated += rewards.numel()
            for i in range(len(problems)):
                differs = bool(rewards[i].max() > rewards[i].min())
                collected.append((not differs, prompt_ids[i], problems[i], completions[i],
                                  rewards[i]))
                num_informative += differs
            if not cfg.dynamic_sampling:
                break
            enough = torch.tensor([float(num_informative >= per_rank)])
            dist.all_reduce(enough, op=dist.ReduceOp.MIN)  # every rank runs the same rounds
            if enough.item():
                break
        rows, total = collected, torch.tensor([float(num_generated * self.ctx.dp_size)])
        if cfg.dynamic_sampling:  # groups whose rewards differ first (a stable sort)
            rows = sorted(collected, key=lambda r: r[0])[:per_rank]
            total = torch.tensor([float(num_generated)])
            dist.all_reduce(total, group=self.ctx.dp_group)
        return (torch.stack([r[1] for r in rows]), [r[2] for r in rows], [r[3] for r in rows],
                torch.stack([r[4] for r in rows]), int(total.item()))

    # ---- generate and score -----------------------------------------------------------------
    def generate(self, problems, n: int, seed: int):
        """Completions for this rank's problems. The embedded engine runs on every rank of the
        replica (TP ranks cooperate); SGLang is asked once per replica, by its first rank, and
        the answer is broadcast over TP, then PP."""
        from megatron_paced.parallel import broadcast_objects_in_replica
        from megatron_paced.rollout.engine import EmbeddedEngine

        prompts = [self.task.prompt_tokens(p) for p in problems]
        ask_here = isinstance(self.rollout, EmbeddedEngine) or (
            self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0)
        answer: tuple = ("ok", None)
        if ask_here:
            try:
                answer = ("ok", self.rollout.generate(prompts, n=n, sampling=self.sampling,
                                                      seed=seed))
            except FloatingPointError as err:
                answer = ("nan", str(err))
        if not isinstance(self.rollout, EmbeddedEngine):
            answer = broadcast_objects_in_replica(answer, self.ctx)
        if answer[0] == "nan":
            raise self.stopped(answer[1], [getattr(p, "prompt_id", None) for p in problems])
        return answer[1]

    def stopped(self, err, prompt_ids: list) -> FloatingPointError:
        """The error that stops the run at a non-finite value, naming the step and prompts."""
        shown = ", ".join(str(i) for i in prompt_ids[:8]) + (", ..." if len(prompt_ids) > 8
                                                             else "")
        return FloatingPointError(f"step {self.step + 1}: {err}; prompt ids [{shown}]; stopping, "
                                  "the last checkpoint is intact")

    def score(self, problems, completions) -> torch.Tensor:
        """(P, G) rewards in [0, 1] from the task's verifier."""
        rewards = self.task.score(problems, completions)
        if not torch.isfinite(rewards).all():
            raise self.stopped("non-finite rewards from the verifier",
                               [getattr(p, "prompt_id", None) for p in problems])
        return rewards

    # ---- replay -----------------------------------------------------------------------------
    def replay_step(self, prompt_ids, fresh, rewards, step: int):
        """Offer the scored samples (priority |acc_est - p_obs|); draw this rank's share."""
        from megatron_paced.paced.replay import ReplaySample

        start = time.perf_counter()
        acc_before = self.log_z.lookup(prompt_ids).double() * self.cfg.beta
        p_obs = rewards.double().mean(dim=1)
        group_size = rewards.shape[1]
        priorities = (acc_before - p_obs).abs().repeat_interleave(group_size)
        samples = [ReplaySample(int(prompt_ids[i // group_size]), fresh.tokens[i],
                                fresh.completion_mask[i], fresh.extras["rollout_log_probs"][i],
                                float(reward), self.step)
                   for i, reward in enumerate(rewards.flatten().tolist())]
        self.replay.add(samples, priorities)
        drawn = self.replay.sample(step)
        per_rank = len(drawn) // self.ctx.dp_size
        mine = drawn[self.ctx.dp_rank * per_rank:(self.ctx.dp_rank + 1) * per_rank]
        self.paced_seconds += time.perf_counter() - start
        return acc_before, p_obs, mine

    def micro_batch_size(self, batch) -> int:
        """--micro-batch-size, or the largest size below it that divides this step's batch
        (it is smaller while the replay buffer fills); the loss is normalized per item, so
        the gradient does not depend on the split."""
        size = self.cfg.micro_batch_size
        while batch.num_sequences % size:
            size -= 1
        return size

    # ---- batch and old log-probs --------------------------------------------------------------
    def fresh_batch(self, problems, completions):
        """This step's rollouts as padded rows (prompt, sample order)."""
        from megatron_paced.rollout.engine import completions_to_batch

        prompts = [self.task.prompt_tokens(p) for p in problems]
        return completions_to_batch(prompts, completions, self.seq_length)

    def make_batch(self, prompt_ids, fresh, rewards, replayed):
        """Fresh rows + replayed rows, with rewards, advantages, pi_old (and pi_ref)."""
        from megatron_paced.forward_backward import SequenceBatch, compute_log_probs
        from megatron_paced.losses import group_normalized_advantages

        group_size = rewards.shape[1]
        num_fresh = fresh.num_sequences
        tokens = torch.cat([fresh.tokens, *(s.tokens[None] for s in replayed)])
        mask = torch.cat([fresh.completion_mask, *(s.completion_mask[None] for s in replayed)])
        rollout_lp = torch.cat([fresh.extras["rollout_log_probs"],
                                *(s.old_log_probs[None] for s in replayed)])
        ids = torch.cat([prompt_ids.repeat_interleave(group_size),
                         torch.tensor([s.prompt_id for s in replayed], dtype=torch.long)])
        rewards_t = torch.cat([rewards.flatten().float(),
                               torch.tensor([s.reward for s in replayed], dtype=torch.float32)])
        groups = torch.cat([torch.arange(num_fresh) // group_size,  # a replayed row: own group
                            -1 - torch.arange(len(replayed))])
        extras = {"prompt_ids": ids, "rewards": rewards_t,
                  "advantages": group_normalized_advantages(rewards_t, groups),
                  "old_log_probs": rollout_lp}
        batch = SequenceBatch(tokens, mask, extras)
        if not self.cfg.use_rollout_logprobs:  # pi_old recomputed by the trainer (default);
            fresh_rows = batch.rows(0, num_fresh)  # replayed rows keep their generator's
            recomputed = compute_log_probs(self.policy.model, fresh_rows, self.ctx,
                                           vocab_size=self.model_cfg.vocab_size,
                                           micro_batch_size=self.micro_batch_size(fresh_rows))
            extras["old_log_probs"] = torch.cat([recomputed.token_log_probs.cpu(),
                                                 rollout_lp[num_fresh:]])
        if self.reference is not None:
            extras["ref_log_probs"] = compute_log_probs(
                self.reference.model, batch, self.ctx, vocab_size=self.model_cfg.vocab_size,
                micro_batch_size=self.micro_batch_size(batch)).token_log_probs.cpu()
        return batch

    # ---- loss and optimize ----------------------------------------------------------------------
    def loss_fn(self):
        from megatron_paced import losses

        cfg = self.cfg
        if cfg.algo == "paced":
            return functools.partial(losses.paced_loss_fn, beta=cfg.beta)
        if cfg.algo == "flowrl":
            return functools.partial(losses.flowrl_loss_fn, beta=cfg.beta,
                                     clip_eps=cfg.flowrl_clip)
        return functools.partial(losses.grpo_loss_fn, kl_coef=cfg.grpo_kl_coef)

    def optimize(self, batch) -> dict:
        """forward_backward through Megatron's schedule, the policy step and the log-Z step."""
        from megatron_paced.forward_backward import forward_backward
        from megatron_paced.parallel import broadcast_from_last_stage

        log_z = self.log_z.lookup(batch.extras["prompt_ids"]).requires_grad_(True)
        batch.extras["log_z"] = log_z
        if self.cfg.inject_nan_at_step == self.step + 1:  # fault injection (tests)
            batch.extras["rewards"][0] = float("nan")
        self.policy.zero_grad()
        try:
            logs = forward_backward(self.policy.model, batch, self.loss_fn(), self.ctx,
                                    vocab_size=self.model_cfg.vocab_size,
                                    micro_batch_size=self.micro_batch_size(batch))
        except FloatingPointError as err:  # raised by the loss before any update
            raise self.stopped(err, self.prompt_ids_of(batch)) from None
        totals = torch.zeros(3, dtype=torch.float64)
        for log in logs:
            totals += torch.stack([log["loss_sum"].double().cpu(),
                                   log.get("num_sequences", log.get("num_tokens")).double().cpu(),
                                   log.get("kl_old_theta_sum", torch.zeros(())).double().cpu()])
        totals = broadcast_from_last_stage(totals, self.ctx)
        dist.all_reduce(totals, group=self.ctx.dp_group)
        loss = float(totals[0] / totals[1].clamp(min=1))
        if not math.isfinite(loss):
            raise self.stopped(f"non-finite loss {loss}", self.prompt_ids_of(batch))
        result = self.policy.step()
        if self.cfg.algo != "grpo":
            grads = log_z.grad if log_z.grad is not None else torch.zeros_like(log_z)
            start = time.perf_counter()
            self.log_z.apply_gradients(batch.extras["prompt_ids"],
                                       broadcast_from_last_stage(grads.detach().clone(), self.ctx))
            self.paced_seconds += time.perf_counter() - start
        return {"loss": loss, "grad_norm": result.grad_norm,
                "kl_old_theta": float(totals[2] / totals[1].clamp(min=1))}

    def prompt_ids_of(self, batch) -> list[int]:
        """The dataset prompt ids of a batch's rows (log-Z rows mapped back), deduplicated."""
        rows = dict.fromkeys(batch.extras["prompt_ids"].tolist())
        return [getattr(self.problems[row], "prompt_id", row) for row in rows]

    # ---- sync and log -----------------------------------------------------------------------
    def sync(self) -> None:
        if self.weight_sync is not None:
            self.weight_sync.push(self.policy.modules()[0], version=str(self.step))
        else:
            self.rollout.update_weights(self.step)

    def dp_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.ctx.dp_group)
        return (t / self.ctx.dp_size).tolist()

    def prompt_accuracy(self, acc_est: torch.Tensor, acc_obs: torch.Tensor) -> dict:
        """This step's (acc_est, observed accuracy) of every selected prompt, all DP ranks."""
        pairs = torch.stack([acc_est.double(), acc_obs.double()], dim=1)
        gathered = [torch.empty_like(pairs) for _ in range(self.ctx.dp_size)]
        dist.all_gather(gathered, pairs, group=self.ctx.dp_group)
        every = torch.cat(gathered)
        return {"prompt_acc_est": [round(v, 4) for v in every[:, 0].tolist()],
                "prompt_acc_obs": [round(v, 4) for v in every[:, 1].tolist()]}

    def log(self, record: dict) -> None:
        if not self.is_logger():
            return
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


def train_step(run: Run) -> dict:
    """One RL step; returns its metrics."""
    start, run.paced_seconds = time.perf_counter(), 0.0
    step = run.step + 1
    prompt_ids, problems, completions, rewards, num_generated = \
        run.select_generate_score(step)                              # select, generate, score
    fresh = run.fresh_batch(problems, completions)
    acc_before, p_obs, replayed = run.replay_step(prompt_ids, fresh, rewards, step)  # replay
    batch = run.make_batch(prompt_ids, fresh, rewards, replayed)                     # pi_old
    losses = run.optimize(batch)                                                     # optimize
    run.step, run.num_samples = step, run.num_samples + num_generated
    run.sync()                                                                       # sync
    reward_mean, mae, selected = run.dp_mean([float(rewards.mean()),                 # log
                                              float((acc_before - p_obs).abs().mean()),
                                              float(acc_before.clamp(0, 1).mean())])
    record = {"step": step, "num_samples": run.num_samples, "reward_mean": reward_mean,
              "acc_est_mae": mae, "selected_acc_est_mean": selected, **losses,
              "num_replayed": len(replayed) * run.ctx.dp_size,
              "step_time_s": time.perf_counter() - start, "paced_overhead_s": run.paced_seconds}
    if run.cfg.log_prompt_accuracy:
        record.update(run.prompt_accuracy(acc_before, p_obs))
    return record


def evaluate(run: Run) -> dict:
    """Unbiased pass@k on held-out problems from --eval-k samples each, for k = 1, 2, 4, ...
    up to --eval-k."""
    cfg, ctx = run.cfg, run.ctx
    per_rank = math.ceil(len(run.eval_problems) / ctx.dp_size)
    mine = run.eval_problems[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
    ks = sorted({2 ** i for i in range(cfg.eval_k.bit_length()) if 2 ** i <= cfg.eval_k}
                | {cfg.eval_k})
    sums = torch.zeros(len(ks), dtype=torch.float64)  # sum over prompts of pass@k, each k
    if mine:
        completions = run.generate(mine, cfg.eval_k, seed=10**6 + run.step)
        num_correct = run.score(mine, completions).gt(0).sum(dim=1)
        sums = torch.stack([pass_at_k(num_correct, cfg.eval_k, k).sum() for k in ks])
    dist.all_reduce(sums, group=ctx.dp_group)
    return {f"eval_pass@{k}": float(total / len(run.eval_problems))
            for k, total in zip(ks, sums)}


def pass_at_k(num_correct: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Unbiased pass@k of each prompt from c correct of n samples: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), float64 (P,)."""
    c = num_correct.to(torch.float64)
    fail = torch.ones_like(c)
    for i in range(k):  # C(n-c, k) / C(n, k) = prod_{i<k} (n-c-i) / (n-i)
        fail = fail * ((n - c - i).clamp(min=0) / (n - i))
    return 1.0 - fail


def sft_warmup(run: Run) -> None:
    """Supervised steps on the reference answers (the base policy of the built-in task)."""
    from megatron_paced.forward_backward import forward_backward
    from megatron_paced.losses import nll_loss

    cfg = run.cfg
    saved_lrs = [group["lr"] for group in run.policy.optimizer.param_groups]
    for group in run.policy.optimizer.param_groups:
        group["lr"] = cfg.sft_lr
    for step in range(cfg.sft_warmup_iters):
        batch = run.task.supervised_batch(cfg.micro_batch_size * run.ctx.dp_size,
                                          seed=cfg.seed * 7 + step, seq_length=run.seq_length)
        run.policy.zero_grad()
        forward_backward(run.policy.model, batch.shard_for_dp(run.ctx.dp_rank, run.ctx.dp_size),
                         nll_loss, run.ctx, vocab_size=run.model_cfg.vocab_size,
                         micro_batch_size=cfg.micro_batch_size)
        run.policy.step()
    for group, lr in zip(run.policy.optimizer.param_groups, saved_lrs):
        group["lr"] = lr


def train(cfgs: dict, task=None) -> Run:
    from megatron_paced.checkpointing import check_loadable, load_checkpoint, save_checkpoint

    cfg = cfgs["train"]
    run = Run(cfgs, task)
    if cfg.load and check_loadable(cfg.load, run.model_cfg, cfg.params_dtype) is not None:
        counters = load_checkpoint(cfg.load, run.policy, run.paced_state)
        run.step = int(counters.get("step", 0))
        run.num_samples = int(counters.get("num_samples", 0))
    if run.step == 0 and cfg.sft_warmup_iters:
        sft_warmup(run)
    if run.reference is not None and cfg.train_iters:
        load_or_save_reference(run)
    if cfg.save and run.is_logger():
        os.makedirs(cfg.save, exist_ok=True)
        _truncate_metrics(run.metrics_path, run.step)
    if cfg.wandb_project and run.is_logger():
        import wandb

        run.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.save,
                               config={k: vars(v) for k, v in cfgs.items()},
                               mode=os.environ.get("WANDB_MODE", "offline"))
    if run.weight_sync is not None:  # servers start from a checkpoint, not from this policy
        run.weight_sync.push(run.policy.modules()[0], version=str(run.step))
    if cfg.eval_interval and run.step == 0:
        run.first_eval = {"step": 0, "num_samples": 0, **evaluate(run)}
        run.log(run.first_eval)
    if cfg.train_iters == 0:  # the warm start alone: a base policy for RL runs to --load
        return save_base_policy(run)
    history: list[dict] = []
    start_step, started = run.step, time.perf_counter()
    while run.step < cfg.train_iters:
        record = train_step(run)
        if cfg.eval_interval and run.step % cfg.eval_interval == 0:
            record.update(evaluate(run))
        run.log(record)
        history.append(record)
        if run.is_logger():
            per_step = (time.perf_counter() - started) / (run.step - start_step)
            eta = per_step * (cfg.train_iters - run.step)
            print(f"step {run.step:5d}/{cfg.train_iters}  reward {record['reward_mean']:.3f}  "
                  f"acc_est_mae {record['acc_est_mae']:.3f}  loss {record['loss']:.4f}  "
                  f"{record['step_time_s']:.2f} s/step  ETA {eta:5.0f} s", flush=True)
        if cfg.save and cfg.save_interval and run.step % cfg.save_interval == 0:
            save_checkpoint(cfg.save, run.step, run.policy, run.paced_state,
                            {"step": run.step, "num_samples": run.num_samples})
        if cfg.exit_after_step is not None and run.step == cfg.exit_after_step:
            dist.barrier()
            os._exit(17)
    if cfg.save and (not cfg.save_interval or run.step % cfg.save_interval):
        save_checkpoint(cfg.save, run.step, run.policy, run.paced_state,
                        {"step": run.step, "num_samples": run.num_samples})
    if run.is_logger() and history:
        print_summary(run, history)
    return run


def save_base_policy(run: Run) -> Run:
    """Save the warm-started policy, weights only (--train-iters 0)."""
    from megatron_paced.checkpointing import save_model_checkpoint

    cfg = run.cfg
    save_model_checkpoint(cfg.save, run.policy.modules()[0], run.model_cfg)
    if run.is_logger():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in (run.first_eval or {}).items()
                          if k.startswith("eval_"))
        print(f"base policy after {cfg.sft_warmup_iters} warm-start steps saved in {cfg.save}"
              + (f" ({shown})" if shown else ""), flush=True)
    return run


def load_or_save_reference(run: Run) -> None:
    """The KL reference is the policy at RL step 0 (after --load and the SFT warm start); it is
    saved once as ``<save>/reference`` (weights only) and reloaded from ``<load>/reference``
    when a run resumes."""
    from megatron_paced.checkpointing import (
        check_loadable, iteration_dir, load_model_weights, save_model_checkpoint,
    )

    cfg = run.cfg
    if run.step == 0:
        run.reference.copy_from(run.policy)
    else:
        root = os.path.join(cfg.load, "reference")
        step = check_loadable(root, run.model_cfg) if os.path.isdir(root) else None
        if step is None:
            raise ConfigError(f"--load {cfg.load!r}: resuming --algo {cfg.algo} needs the KL "
                              f"reference saved at step 0 in {root}")
        load_model_weights(iteration_dir(root, step), run.reference.model[0], run.model_cfg,
                           run.ctx)
    if cfg.save and (run.step == 0 or os.path.abspath(cfg.save) != os.path.abspath(cfg.load)):
        save_model_checkpoint(os.path.join(cfg.save, "reference"), run.reference.model[0],
                              run.model_cfg)


def print_summary(run: Run, history: list[dict]) -> None:
    """What the run did: accuracy before and after, samples, calibration of beta * log_z."""
    cfg = run.cfg
    window = max(1, min(10, len(history) // 3))
    first, last = history[:window], history[-window:]

    def mean(rows, key):
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else float("nan")

    evals = [r for r in ([run.first_eval] if run.first_eval else []) + history
             if "eval_pass@1" in r]
    lines = [f"\n{cfg.algo} run: steps {history[0]['step']}-{history[-1]['step']}, "
             f"{run.num_samples} completions generated"]
    if len(evals) >= 2:
        k = f"eval_pass@{cfg.eval_k}"
        lines.append(f"  held-out pass@1 {evals[0]['eval_pass@1']:.3f} -> "
                     f"{evals[-1]['eval_pass@1']:.3f}, pass@{cfg.eval_k} {evals[0][k]:.3f} -> "
                     f"{evals[-1][k]:.3f}")
    lines.append(f"  training reward (first/last {window} steps) {mean(first, 'reward_mean'):.3f}"
                 f" -> {mean(last, 'reward_mean'):.3f}")
    lines.append(f"  calibration |beta*log_z - observed group accuracy| (first/last {window} "
                 f"steps) {mean(first, 'acc_est_mae'):.3f} -> {mean(last, 'acc_est_mae'):.3f}")
    if cfg.save:
        lines.append(f"  metrics {os.path.join(cfg.save, 'metrics.jsonl')}; checkpoints "
                     f"{cfg.save}/iter_*")
    print("\n".join(lines), flush=True)


def _truncate_metrics(path: str | None, step: int) -> None:
    """On resume, drop metric rows after the checkpoint's step (they will be redone)."""
    if not path or not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def validate_startup(cfgs: dict, world_size: int):
    """Every check that needs no process group, so bad flags fail before any work; returns
    the task (its prompts are read and tokenized here)."""
    from megatron_paced.checkpointing import check_loadable
    from megatron_paced.tasks import build_task, check_task_fits_model

    parallel, model_cfg, train_cfg = cfgs["parallel"], cfgs["model"], cfgs["train"]
    parallel.validate(world_size=world_size)
    model_cfg.validate(parallel)
    for name in ("task", "data", "optimizer", "log_z", "selection", "replay", "rollout"):
        cfgs[name].validate()
    train_cfg.validate(parallel.data_parallel_size(world_size), cfgs["replay"])
    if train_cfg.load:
        check_loadable(train_cfg.load, model_cfg, train_cfg.params_dtype)
    task = build_task(cfgs["task"], cfgs["data"], seed=train_cfg.seed,
                      eval_num_prompts=train_cfg.eval_num_prompts)
    try:
        flag = (f"--tokenizer {cfgs['task'].tokenizer}" if cfgs["task"].tokenizer
                else "the arithmetic task's tokenizer")
        check_task_fits_model(task, model_cfg, train_cfg.max_new_tokens, flag)
        require(train_cfg.num_prompts_per_step <= len(task.problems), "num_prompts_per_step",
                train_cfg.num_prompts_per_step,
                f"must be <= the {len(task.problems)} training prompts of --task "
                f"{cfgs['task'].task}")
        require(not train_cfg.dynamic_sampling
                or cfgs["selection"].prompt_selection == "uniform", "dynamic_sampling", True,
                "draws fresh prompts each round: it needs --prompt-selection uniform")
        if train_cfg.sft_warmup_iters and cfgs["task"].task != "arithmetic":
            task.supervised_batch(0, 0, 0)  # raises: no built-in warm start
        if not (train_cfg.load or train_cfg.sft_warmup_iters or train_cfg.allow_random_init):
            raise ConfigError(
                "the policy would start from random weights (no --load, --sft-warmup-iters 0), "
                "and RL from random weights learns nothing: start from a checkpoint (--load "
                "DIR, e.g. tools/convert_hf_to_megatron.py output), warm-start the built-in "
                "task (--sft-warmup-iters 1000), or run the demo (--config examples/demo.yaml); "
                "--allow-random-init runs it anyway")
    except ConfigError:
        task.close()
        raise
    return task


def main(argv: list[str] | None = None) -> int:
    cfgs = parse_args(argv)
    try:
        task = validate_startup(cfgs, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"paced-train: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        train(cfgs, task)
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
