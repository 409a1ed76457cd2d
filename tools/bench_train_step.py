"""Benchmark: throughput of the parts of one RL step on one device, random weights.

On a model of ``--model``'s shape (random weights, world size 1) it times the trainer's own
stage functions (``rl.batch.build_train_batch`` makes the batch, ``rl.optimize.optimize_step``
with ``rl.optimize.loss_fn_for`` is the step, ``rl.old_log_probs.attach_old_log_probs`` the
recompute, ``paced.replay.offer_and_draw`` the replay), median of ``--repeats`` after one
warm-up:

    tb step            forward + backward of the PACED TB loss, the Adam step, the log-Z step
    grpo step          the same step with the GRPO loss (no log-Z): the baseline
    logprob recompute  forward only (pi_old before the update)
    generation         the embedded engine: --generate-prompts x --samples-per-prompt rows of
                       --prompt-length tokens, --max-new-tokens each (no stop token)
    paced bookkeeping  selection over a --num-prompts table, replay add/draw, log-Z lookup

and prints tokens/s, model TFLOP/s, MFU and peak memory of each, and the PACED parts' share of
one RL step: ``(tb step - grpo step) + bookkeeping`` over ``generation + recompute + tb step``
(the TB and GRPO steps run alternately and their difference is the median over the pairs, with
the pairs' spread: on a busy CPU that spread is larger than the difference).

Model FLOPs are counted without recomputation (``6 N`` per trained token for the weights plus
causal attention, ``2 N`` per forward token); MFU divides them by the device's dense peak for
the precision (bf16 or fp32; ``--peak-tflops`` to override; none on a CPU).

    python tools/bench_train_step.py                       # tiny model, CPU, seconds
    python tools/bench_train_step.py --model qwen2.5-1.5b --bf16 --num-sequences 64 \\
        --seq-length 1024 --micro-batch-size 4 --generate-prompts 16 --max-new-tokens 256
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from megatron_paced.config import FlagParser, description

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense (no sparsity) peak TFLOP/s by device name, first match wins: (bf16, fp32 without TF32).
PEAK_TFLOPS = (("H100 PCIe", 756.0, 51.2), ("H100", 989.4, 66.9), ("H200", 989.4, 66.9),
               ("H800", 989.4, 66.9), ("A100", 312.0, 19.5), ("B200", 2250.0, 80.0))


@dataclass
class Part:
    name: str
    seconds: float
    tokens: int
    flops: float
    peak_gib: float | None

    def row(self, peak_flops: float | None) -> str:
        tflops = self.flops / self.seconds / 1e12
        mfu = f"{100 * tflops * 1e12 / peak_flops:6.1f}%" if peak_flops else "     -"
        peak = f"{self.peak_gib:8.1f}" if self.peak_gib is not None else "       -"
        return (f"{self.name:<22} {self.seconds * 1e3:10.1f} {self.tokens / self.seconds:11.0f} "
                f"{tflops:9.2f} {mfu} {peak}")


def matmul_params(cfg) -> int:
    """Weights that multiply every token: the layers' linear layers and the output layer."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + \
        3 * cfg.hidden_size * cfg.ffn_hidden_size
    return cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size


def forward_flops(cfg, num_tokens: int, mean_context: float) -> float:
    """Model FLOPs of a forward pass over ``num_tokens`` tokens that each attend to
    ``mean_context`` earlier tokens on average."""
    q = cfg.num_attention_heads * cfg.head_dim
    attention = cfg.num_layers * 4 * q * mean_context  # QK^T and AV
    return num_tokens * (2 * matmul_params(cfg) + attention)


def peak_tflops(device: torch.device, bf16: bool,
                override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override
    for key, bf16_peak, fp32_peak in PEAK_TFLOPS:
        if key in name:
            return name, bf16_peak if bf16 else fp32_peak
    return name, None


class Timer:
    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> tuple[float, float | None]:
        """Median seconds of ``fn`` over the repeats after one warm-up, and peak GiB."""
        (samples,), peak = self.times(fn)
        return statistics.median(samples), peak

    def times(self, *fns) -> tuple[list[list[float]], float | None]:
        """Seconds of each of ``fns`` over the repeats, after one warm-up each, and the peak
        GiB. Several run in turn, the order reversed every other repeat (a b, b a, ...), so
        that drift, noise and what one leaves to the next fall on all alike."""
        for fn in fns:
            fn()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        samples: list[list[float]] = [[] for _ in fns]
        for repeat in range(self.repeats):
            order = list(zip(fns, samples))
            for fn, out in order if repeat % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                self.sync()
                out.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == "cuda" else None)
        return samples, peak


def rl_batch(args, vocab_size: int):
    """--num-sequences rows of --seq-length tokens (a --prompt-length prompt, then the
    completion) in groups of --samples-per-prompt, built by the trainer's own
    :func:`~megatron_paced.rl.batch.build_train_batch`; returns (prompt rows, fresh rows,
    rewards, train batch)."""
    from megatron_paced.rl.batch import build_train_batch
    from megatron_paced.rollout.engine import RolloutBatch

    gen = torch.Generator().manual_seed(0)
    num_groups = args.num_sequences // args.samples_per_prompt
    num_rows = num_groups * args.samples_per_prompt
    tokens = torch.randint(0, vocab_size, (num_rows, args.seq_length), generator=gen)
    mask = torch.zeros(num_rows, args.seq_length)
    mask[:, args.prompt_length:] = 1.0
    fresh = RolloutBatch(tokens, mask, rollout_log_probs=torch.full_like(mask, -2.0) * mask)
    rewards = torch.randint(0, 2, (num_groups, args.samples_per_prompt), generator=gen).float()
    prompt_rows = torch.arange(num_groups) % args.num_prompts
    return prompt_rows, fresh, rewards, build_train_batch(prompt_rows, fresh, rewards, [])


def bench(args) -> dict:
    from megatron_paced.config import OptimizerConfig, ParallelConfig
    from megatron_paced.models.config import resolve_model_config
    from megatron_paced.models.policy import build_policy, build_reference
    from megatron_paced.paced.learned_log_z import build_log_z_table
    from megatron_paced.paced.log_z import LogZConfig
    from megatron_paced.paced.replay import DistributedReplay, ReplayConfig, offer_and_draw
    from megatron_paced.paced.selection import PromptSelector, SelectionConfig
    from megatron_paced.parallel import initialize_parallel
    from megatron_paced.models.counting import count_parameters
    from megatron_paced.job import AlgorithmConfig
    from megatron_paced.rl.old_log_probs import attach_old_log_probs
    from megatron_paced.rl.optimize import loss_fn_for, optimize_step
    from megatron_paced.rollout.engine import EmbeddedEngine, SamplingParams
    from megatron_paced.models.config import PRESETS

    cfg = resolve_model_config(args.model, args.hf_config, PRESETS["tiny"])
    ctx = initialize_parallel(ParallelConfig(), seed=1)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    policy = build_policy(cfg, OptimizerConfig(lr=1e-6), ctx, seed=1, params_dtype=dtype,
                          micro_batch_size=args.micro_batch_size)
    reference = (build_reference(cfg, ctx, seed=1, copy_from=policy, params_dtype=dtype)
                 if args.reference else None)  # held in memory, as FlowRL/GRPO-KL runs do
    log_z = build_log_z_table(args.num_prompts, LogZConfig(), beta=0.05, target_acc=0.5)
    selector = PromptSelector(SelectionConfig(), seed=1)
    replay = DistributedReplay(ReplayConfig(replay_size=128, replay_per_step=16,
                                            replay_successful_only=False),
                               num_prompts=args.num_prompts, seed=1)
    _, fresh, rewards, batch = rl_batch(args, cfg.vocab_size)
    timer = Timer(ctx.device, args.repeats)
    step = [0]

    def train_step(loss_fn, with_log_z: bool) -> None:
        # The trainer's optimization stage; the GRPO step reads log-Z rows but trains none.
        optimize_step(policy, log_z, batch, loss_fn, ctx, train_log_z=with_log_z,
                      step=step[0])

    def bookkeeping() -> None:
        # The trainer's PACED parts outside the loss: global selection, the replay offer and
        # draw (rl stages), and a log-Z update of the selected rows.
        step[0] += 1
        rows = selector.select(log_z, rewards.shape[0], step[0])
        acc_est = log_z.acc_est(rows)
        offer_and_draw(replay, rows, acc_est, fresh, rewards, step=step[0], version=step[0])
        log_z.apply_gradients(rows, torch.randn(len(rows)))

    engine = EmbeddedEngine(policy.model, ctx, vocab_size=cfg.vocab_size,
                            max_sequence_length=args.prompt_length + args.max_new_tokens,
                            max_batch_size=args.generate_batch)
    prompts = torch.randint(0, cfg.vocab_size, (args.generate_prompts, args.prompt_length),
                            generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)

    def generate() -> None:
        engine.generate(prompts, n=args.samples_per_prompt, sampling=sampling, seed=1)

    trained_tokens = batch.num_sequences * args.seq_length
    train_flops = 3 * forward_flops(cfg, trained_tokens, args.seq_length / 2)
    num_rows = args.generate_prompts * args.samples_per_prompt
    gen_tokens = num_rows * args.max_new_tokens
    gen_flops = (forward_flops(cfg, num_rows * args.prompt_length, args.prompt_length / 2)
                 + forward_flops(cfg, gen_tokens, args.prompt_length + args.max_new_tokens / 2))
    (tb_times, grpo_times), peak = timer.times(
        lambda: train_step(loss_fn_for(AlgorithmConfig(algo="paced", beta=0.05)), True),
        lambda: train_step(loss_fn_for(AlgorithmConfig(algo="grpo")), False))
    loss_extra = sorted(a - b for a, b in zip(tb_times, grpo_times))
    parts = [Part("tb step (PACED)", statistics.median(tb_times), trained_tokens, train_flops,
                  peak),
             Part("grpo step", statistics.median(grpo_times), trained_tokens, train_flops, peak)]
    seconds, peak = timer(lambda: attach_old_log_probs(
        batch, num_fresh=batch.num_sequences, policy=policy, reference=None,
        dp_group=ctx.dp_group, recompute=True))
    parts.append(Part("logprob recompute", seconds, trained_tokens,
                      forward_flops(cfg, trained_tokens, args.seq_length / 2), peak))
    seconds, peak = timer(generate)
    parts.append(Part("generation", seconds, gen_tokens, gen_flops, peak))
    seconds, _ = timer(bookkeeping)
    parts.append(Part("paced bookkeeping", seconds, 0, 0.0, None))
    device_name, peak_tf = peak_tflops(ctx.device, args.bf16, args.peak_tflops)
    times = {p.name: p.seconds for p in parts}
    rl_step = times["generation"] + times["logprob recompute"] + times["tb step (PACED)"]
    paced_extra = statistics.median(loss_extra) + times["paced bookkeeping"]
    del reference
    return {"device": device_name, "model": args.model or args.hf_config or "tiny",
            "num_params": count_parameters(cfg), "dtype": str(dtype).removeprefix("torch."),
            "peak_tflops": peak_tf, "args": vars(args), "parts": [asdict(p) for p in parts],
            "rl_step_s": rl_step, "paced_extra_s": paced_extra,
            "paced_extra_spread_s": (loss_extra[-1] - loss_extra[0]) / 2,
            "paced_share": paced_extra / rl_step,
            "paced_share_of_train_step": paced_extra / times["grpo step"]}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_table(result: dict) -> None:
    a = result["args"]
    peak = result["peak_tflops"]
    print(f"device {result['device']}"
          + (f" (peak {peak:.0f} TFLOP/s {result['dtype']})" if peak else "")
          + f"; model {result['model']} ({_count(result['num_params'])} parameters, random "
          f"weights), {result['dtype']}; train batch {a['num_sequences']} x {a['seq_length']} "
          f"tokens, micro batch {a['micro_batch_size']}; generation "
          f"{a['generate_prompts']} x {a['samples_per_prompt']} rows, {a['prompt_length']} + "
          f"{a['max_new_tokens']} tokens; reference model {'on' if a['reference'] else 'off'}; "
          f"median of {a['repeats']}")
    print(f"{'part':<22} {'time ms':>10} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} "
          f"{'peak GiB':>8}")
    for part in result["parts"]:
        print(Part(**part).row(peak * 1e12 if peak else None))
    print(f"PACED parts: (tb step - grpo step, median of paired runs) + bookkeeping = "
          f"{result['paced_extra_s'] * 1e3:.1f} ms (pairs spread +-"
          f"{result['paced_extra_spread_s'] * 1e3:.1f} ms) = {100 * result['paced_share']:.2f}% "
          f"of the RL step (generation + recompute + tb step = {result['rl_step_s'] * 1e3:.0f} "
          f"ms), {100 * result['paced_share_of_train_step']:.2f}% of the GRPO training step")


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--model", help="a preset (default: the trainer's tiny model)")
    parser.add_argument("--hf-config", help="an HF config.json instead of a preset")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--num-sequences", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--generate-prompts", type=int, default=2)
    parser.add_argument("--generate-batch", type=int, default=64,
                        help="rows per engine forward (the engine's --max-batch-size)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=7473,
                        help="log-Z table size (GSM8K's training set by default)")
    parser.add_argument("--reference", action="store_true",
                        help="also hold a reference model in memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} {getattr(args, k)}: must be >= 1" for k in (
        "num_sequences", "seq_length", "micro_batch_size", "samples_per_prompt",
        "generate_prompts", "generate_batch", "max_new_tokens", "num_prompts", "repeats")
        if getattr(args, k) < 1]
    if args.prompt_length < 1 or args.prompt_length >= args.seq_length:
        problems.append(f"--prompt-length {args.prompt_length}: must be in [1, --seq-length)")
    if args.num_sequences % args.micro_batch_size:
        problems.append(f"--micro-batch-size {args.micro_batch_size}: must divide "
                        f"--num-sequences {args.num_sequences}")
    if problems:
        parser.error("; ".join(problems))
    result = bench(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
