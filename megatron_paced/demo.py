"""The embedded-default demo: train a tiny Megatron GPTModel on multi-digit addition, on CPUs.

Until the RL trainer lands, ``make demo`` runs this smaller end-to-end job: a supervised
warm start (per-token NLL of the answers) of a tiny Llama-style ``GPTModel`` through the
same stack the trainer uses -- Megatron parallel state on gloo, the pipeline schedule,
DDP, the distributed optimizer and vocab-parallel log-probs. Before and after training it
measures, on held-out problems, the greedy-decoding exact-match accuracy per number of
digits (greedy decoding reproduces the answer iff every answer token is the model's argmax
given the correct prefix, so one teacher-forced pass measures it exactly) and the mean
log-probability of the answers. It prints what it did and those numbers.

Usage::

    torchrun --standalone --nproc-per-node 2 -m megatron_paced.demo \\
        --tensor-model-parallel-size 2 --train-iters 300
    python -m megatron_paced.demo --help
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from megatron_paced.config import (
    ConfigError, OptimizerConfig, ParallelConfig, add_flags, from_args, require,
)
from megatron_paced.models.config import ModelConfig
from megatron_paced.tasks.arithmetic import AdditionTask, CharTokenizer


@dataclass
class DemoConfig:
    """The supervised demo job."""

    train_iters: int = 1000
    """Optimizer steps."""
    global_batch_size: int = 64
    """Sequences per step over all data-parallel ranks."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one rank."""
    seed: int = 1234
    """Seed of the weights and the data."""
    min_digits: int = 1
    """Fewest digits of an addend."""
    max_digits: int = 3
    """Most digits of an addend."""
    num_eval_problems: int = 256
    """Held-out problems for the before/after accuracy."""
    log_interval: int = 100
    """Print the training loss every this many steps."""

    def validate(self, dp_size: int) -> None:
        require(self.train_iters >= 0, "train_iters", self.train_iters, "must be >= 0")
        require(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size,
                "must be >= 1")
        require(self.global_batch_size % (self.micro_batch_size * dp_size) == 0,
                "global_batch_size", self.global_batch_size,
                f"must be divisible by --micro-batch-size {self.micro_batch_size} x "
                f"data-parallel size {dp_size}")
        require(self.num_eval_problems % (self.micro_batch_size * dp_size) == 0,
                "num_eval_problems", self.num_eval_problems,
                f"must be divisible by --micro-batch-size {self.micro_batch_size} x "
                f"data-parallel size {dp_size}")
        require(1 <= self.min_digits <= self.max_digits <= 8, "max_digits", self.max_digits,
                f"need 1 <= --min-digits ({self.min_digits}) <= --max-digits <= 8")


DEMO_MODEL = ModelConfig(architecture="llama", num_layers=4, hidden_size=128,
                         ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
                         max_position_embeddings=64, untie_embeddings_and_output_weights=True)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m megatron_paced.demo",
        description="Supervised warm start of a tiny GPTModel on addition (CPU or GPU).")
    add_flags(parser, DemoConfig, "demo")
    add_flags(parser, ParallelConfig, "parallelism")
    add_flags(parser, ModelConfig, "model")
    add_flags(parser, OptimizerConfig, "optimizer")
    parser.set_defaults(**{k: v for k, v in vars(DEMO_MODEL).items()},
                        lr=3e-3, weight_decay=0.0, adam_beta2=0.98)
    args = parser.parse_args(argv)
    return (from_args(DemoConfig, args), from_args(ParallelConfig, args),
            from_args(ModelConfig, args), from_args(OptimizerConfig, args))


def validate_all(demo, parallel, model_cfg, optim, world_size: int) -> None:
    """Every check that needs no process group, so bad flags fail before any work."""
    parallel.validate(world_size=world_size)
    model_cfg.validate(parallel)
    optim.validate()
    demo.validate(parallel.data_parallel_size(world_size))
    seq_length = AdditionTask(demo.min_digits, demo.max_digits).max_sequence_length
    require(model_cfg.max_position_embeddings >= seq_length, "max_position_embeddings",
            model_cfg.max_position_embeddings, f"must be >= {seq_length} for the task")


def run(demo: DemoConfig, parallel: ParallelConfig, model_cfg: ModelConfig,
        optim: OptimizerConfig) -> dict:
    from megatron_paced.forward_backward import compute_log_probs, forward_backward
    from megatron_paced.losses import nll_loss
    from megatron_paced.models.policy import build_policy
    from megatron_paced.parallel import destroy_parallel, initialize_parallel

    import torch.distributed as dist

    start = time.perf_counter()
    ctx = initialize_parallel(parallel, seed=demo.seed)
    say = print if ctx.rank == 0 else (lambda *a, **k: None)
    tokenizer = CharTokenizer()
    task = AdditionTask(demo.min_digits, demo.max_digits)
    seq_length = task.max_sequence_length
    policy = build_policy(model_cfg, optim, ctx, seed=demo.seed)
    num_params = sum(p.numel() for p in model_cfg_params(policy))
    say(f"megatron-paced demo: supervised warm start on {demo.min_digits}-{demo.max_digits}"
        f"-digit addition\n  layout  TP{ctx.tp_size} x PP{ctx.pp_size} x DP{ctx.dp_size} on "
        f"{ctx.world_size} process(es), {ctx.device.type}, "
        f"{dist.get_backend()}\n  model   Megatron GPTModel ({model_cfg.architecture}), "
        f"{model_cfg.num_layers} layers x {model_cfg.hidden_size}, ~{num_params / 1e6:.2f}M "
        f"params (this rank's shard)\n  optim   {optim.optimizer} lr {optim.lr}, distributed "
        f"optimizer {optim.use_distributed_optimizer}; {demo.train_iters} steps x "
        f"{demo.global_batch_size} sequences")

    eval_problems = task.sample(demo.num_eval_problems, seed=demo.seed + 10**6)
    eval_batch = task.to_batch(eval_problems, tokenizer, seq_length)

    def evaluate() -> dict:
        local = eval_batch.shard_for_dp(ctx.dp_rank, ctx.dp_size)
        result = compute_log_probs(policy.model, local, ctx, vocab_size=model_cfg.vocab_size,
                                   micro_batch_size=demo.micro_batch_size)
        stats = torch.stack([result.greedy_matches(local.completion_mask).float(),
                             result.sequence_log_probs, local.extras["num_digits"].float()])
        parts = [torch.empty_like(stats) for _ in range(ctx.dp_size)]
        dist.all_gather(parts, stats, group=ctx.dp_group)
        matches, seq_lp, digits = torch.cat(parts, dim=1)
        per_digit = {int(d): float(matches[digits == d].mean()) for d in digits.unique()}
        return {"exact_match": float(matches.mean()), "answer_log_prob": float(seq_lp.mean()),
                "per_digit": per_digit}

    before = evaluate()
    losses = []
    for step in range(1, demo.train_iters + 1):
        problems = task.sample(demo.global_batch_size, seed=demo.seed * 100_003 + step)
        batch = task.to_batch(problems, tokenizer, seq_length).shard_for_dp(ctx.dp_rank,
                                                                             ctx.dp_size)
        policy.zero_grad()
        logs = forward_backward(policy.model, batch, nll_loss, ctx,
                                vocab_size=model_cfg.vocab_size,
                                micro_batch_size=demo.micro_batch_size)
        grad_norm = policy.step().grad_norm
        losses.append(_global_mean_nll(logs, ctx))
        if step % demo.log_interval == 0 or step == demo.train_iters:
            say(f"  step {step:5d}/{demo.train_iters}  nll/token {losses[-1]:.4f}  "
                f"grad-norm {grad_norm:.3f}  {time.perf_counter() - start:6.1f} s")
    after = evaluate()
    elapsed = time.perf_counter() - start
    say(f"\ngreedy exact match on {demo.num_eval_problems} held-out problems")
    say("  digits   before   after")
    for digits in sorted(after["per_digit"]):
        say(f"  {digits:6d}   {before['per_digit'][digits]:6.3f}   {after['per_digit'][digits]:6.3f}")
    say(f"  all      {before['exact_match']:6.3f}   {after['exact_match']:6.3f}")
    say(f"mean answer log-prob {before['answer_log_prob']:.3f} -> {after['answer_log_prob']:.3f}"
        f"; {demo.train_iters * demo.global_batch_size} training sequences in {elapsed:.1f} s")
    destroy_parallel(destroy_process_group=True)
    return {"before": before, "after": after, "losses": losses, "seconds": elapsed}


def model_cfg_params(policy) -> list[torch.Tensor]:
    return [p for module in policy.modules() for p in module.parameters()]


def _global_mean_nll(logs: list[dict], ctx) -> float:
    """Per-token NLL of the step over all DP ranks, broadcast from the last stage."""
    import torch.distributed as dist

    totals = torch.zeros(2, dtype=torch.float64)
    for log in logs:
        totals += torch.stack([log["nll_sum"].double(), log["num_tokens"].double()]).cpu()
    dist.all_reduce(totals, group=ctx.dp_group)
    if ctx.pp_size > 1:
        dist.broadcast(totals, src=ctx.last_stage_global_rank(), group=ctx.pp_group)
    return float(totals[0] / totals[1].clamp(min=1))


def main(argv: list[str] | None = None) -> int:
    demo, parallel, model_cfg, optim = parse_args(argv)
    model_cfg = model_cfg.replace(vocab_size=CharTokenizer().vocab_size)
    try:
        validate_all(demo, parallel, model_cfg, optim, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"python -m megatron_paced.demo: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    run(demo, parallel, model_cfg, optim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
