"""Worker: one model, one device, several precisions -> what a training step computes.

For each ``--dtypes`` entry it builds the same seeded policy (Megatron DDP + Adam, world size
1) on whatever device this process has (CUDA when visible, else the CPU) and saves to
``OUT/<device>-<dtype>.pt``:

* ``log_probs``: (B, T) token log-probs of a fixed batch (``compute_log_probs``);
* ``loss``, ``grads`` (fp32 main grads of every parameter, by name) and ``log_z_grad`` of one
  PACED TB forward/backward, then ``grad_norm`` and ``params`` after one Adam step;
* ``greedy_tokens``, ``greedy_log_probs`` and ``greedy_recomputed`` (the trainer's log-probs of
  the same tokens): one greedy generation of the embedded engine, (B, T) rows and mask;
* ``greedy_margins``: (B, T) top-1 minus top-2 logit behind each generated token, so that a
  comparison can tell a near-tie from a wrong token;
* ``device``, ``param_dtypes``, ``main_grad_dtypes``: what actually ran.

With ``--recompute``, also ``OUT/<device>-recompute-<granularity>.pt`` for fp32 with
``--recompute-granularity`` selective and full: the log-probs, loss and gradients of the same
step, and ``num_recomputed`` (calls of Megatron's recompute backward).

The test process compares the files (:func:`compare` in ``tests/test_device.py``); CUDA
against the CPU is the GPU test, bf16 against fp32 on the CPU runs everywhere.

    python -m tests.distributed.device_worker --out DIR --dtypes float32 bfloat16
    CUDA_VISIBLE_DEVICES= python -m tests.distributed.device_worker --out DIR --dtypes float32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import torch

from megatron_paced.config import OptimizerConfig, ParallelConfig
from megatron_paced.forward_backward import compute_log_probs, compute_logits, forward_backward
from megatron_paced.losses import paced_loss_fn
from megatron_paced.models.config import PRESETS
from megatron_paced.models.gpt import canonical_param_name
from megatron_paced.models.policy import build_policy
from megatron_paced.parallel import initialize_parallel
from megatron_paced.rl.batch import RLBatch
from megatron_paced.rollout.engine import EmbeddedEngine, SamplingParams, completions_to_batch
from tests.distributed.invariance_worker import SEQ_LENGTH, make_global_batch

MODEL = PRESETS["tiny-qwen2"].replace(hidden_size=128, ffn_hidden_size=256,
                                     untie_embeddings_and_output_weights=True)
SEED = 1234
BETA = 0.05
PROMPTS = [[3, 14, 15, 92], [6, 53], [58, 97, 93, 23, 84, 62], [64], [26, 43, 38]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def train_step(policy, ctx) -> dict:
    batch = make_global_batch(MODEL.vocab_size)
    log_probs = compute_log_probs(policy.model, batch, ctx, vocab_size=MODEL.vocab_size,
                                  micro_batch_size=4).token_log_probs.cpu()
    gen = torch.Generator().manual_seed(3)
    log_z = torch.zeros(batch.num_sequences, requires_grad=True)
    n = batch.num_sequences
    batch = RLBatch(batch.tokens, batch.completion_mask, log_z_rows=torch.arange(n),
                    updates_log_z=torch.ones(n, dtype=torch.bool),
                    rewards=torch.randint(0, 2, (n,), generator=gen).float(),
                    advantages=torch.zeros(n),
                    old_log_probs=log_probs + 0.01 * torch.randn(log_probs.shape,
                                                                 generator=gen),
                    log_z=log_z)
    policy.zero_grad()
    logs = forward_backward(policy.model, batch, functools.partial(paced_loss_fn, beta=BETA),
                            ctx, vocab_size=MODEL.vocab_size, micro_batch_size=4)
    module = policy.modules()[0]
    # By the local spec's names: a TE model's fused norms compare with the CPU's.
    grads = {canonical_param_name(n): p.main_grad.detach().float().cpu().clone()
             for n, p in module.named_parameters()}
    main_grad_dtypes = sorted({str(p.main_grad.dtype) for p in module.parameters()})
    result = policy.step()
    return {
        "log_probs": log_probs,
        "loss": float(sum(float(log["loss_sum"]) for log in logs)) / batch.num_sequences,
        "grads": grads, "main_grad_dtypes": main_grad_dtypes,
        "log_z_grad": log_z.grad.detach().clone(),
        "grad_norm": float(result.grad_norm),
        "params": {canonical_param_name(n): p.detach().float().cpu().clone()
                   for n, p in module.named_parameters()},
    }


def greedy_generation(policy, ctx) -> dict:
    engine = EmbeddedEngine(policy.model, ctx, vocab_size=MODEL.vocab_size,
                            max_sequence_length=SEQ_LENGTH)
    out = engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0,
                                                                max_new_tokens=10), seed=1)
    batch = completions_to_batch(PROMPTS, out, SEQ_LENGTH)
    recomputed = compute_log_probs(policy.model, batch, ctx, vocab_size=MODEL.vocab_size,
                                   micro_batch_size=batch.num_sequences).token_log_probs.cpu()
    logits = compute_logits(policy.model, batch, ctx, vocab_size=MODEL.vocab_size,
                            micro_batch_size=batch.num_sequences).cpu()
    top2 = logits.topk(2, dim=-1).values
    margins = torch.nn.functional.pad((top2[..., 0] - top2[..., 1])[:, :-1], (1, 0))
    return {"greedy_tokens": batch.tokens, "greedy_mask": batch.completion_mask,
            "greedy_log_probs": batch.rollout_log_probs,
            "greedy_recomputed": recomputed, "greedy_margins": margins}


def recompute_runs(ctx, out: Path) -> None:
    """The fp32 step again with each activation-recompute granularity, counting recomputes."""
    from megatron.core.tensor_parallel import random as tp_random

    calls = [0]
    backward = tp_random.CheckpointFunction.backward

    def counting_backward(fn_ctx, *args):
        calls[0] += 1
        return backward(fn_ctx, *args)

    tp_random.CheckpointFunction.backward = staticmethod(counting_backward)
    for granularity in ("selective", "full"):
        calls[0] = 0
        layout = dataclasses.replace(ctx, config=dataclasses.replace(
            ctx.config, recompute_granularity=granularity))
        policy = build_policy(MODEL, OptimizerConfig(lr=1e-3, clip_grad=0.0), layout, seed=SEED)
        record = {key: value for key, value in train_step(policy, layout).items()
                  if key in ("log_probs", "loss", "grads", "log_z_grad", "grad_norm", "params")}
        record["num_recomputed"] = calls[0]
        torch.save(record, out / f"{ctx.device.type}-recompute-{granularity}.pt")
    tp_random.CheckpointFunction.backward = backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--recompute", action="store_true")
    args = parser.parse_args()
    ctx = initialize_parallel(ParallelConfig(), seed=SEED)
    for name in args.dtypes:
        policy = build_policy(MODEL, OptimizerConfig(lr=1e-3, clip_grad=0.0), ctx, seed=SEED,
                              params_dtype=DTYPES[name])
        record = {"device": ctx.device.type, "dtype": name,
                  "param_dtypes": sorted({str(p.dtype) for p in policy.modules()[0].parameters()})}
        record.update(greedy_generation(policy, ctx))  # before the step: the seeded weights
        record.update(train_step(policy, ctx))
        torch.save(record, Path(args.out) / f"{ctx.device.type}-{name}.pt")
    if args.recompute:
        recompute_runs(ctx, Path(args.out))


if __name__ == "__main__":
    main()
