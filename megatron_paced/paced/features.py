"""Prompt features for a learned log-Z head: one embedding per prompt from a frozen model.

    feature(x) = mean over the prompt's tokens t of h_L(x)_t        (pooling "mean")
               = h_L(x)_{last prompt token}                          (pooling "last")

where ``h_L`` is the model's last hidden state after the final norm (what the output layer
reads), computed through Megatron's pipeline schedule in eval mode, on any TP x PP layout: a
forward hook on the last stage's final norm keeps its output (gathered over TP when sequence
parallelism splits it), the pooled rows are broadcast to every pipeline stage, so every rank
of a model replica returns the same (P, H) float32 tensor. FlowRL's ``ProjZ`` reads the same
kind of feature (the mean of the policy's last-layer hidden states over the prompt); the
PACED-RL paper's appendix pools a frozen reference model's embeddings.

Usage::

    features = prompt_features(reference.model, prompt_tokens, ctx, micro_batch_size=16)
    features.shape                      # (len(prompt_tokens), hidden_size)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from megatron_paced.forward_backward import SequenceBatch, _forward_only, micro_batch_size_for
from megatron_paced.models.sharding import unwrap_model
from megatron_paced.parallel import ParallelContext, broadcast_from_last_stage


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor,
                pooling: Literal["mean", "last"] = "mean") -> torch.Tensor:
    """(b, s, h) hidden states, (b, s) 0/1 prompt mask (a prefix of each row) -> (b, h)."""
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return hidden[torch.arange(len(hidden)), last]


@torch.no_grad()
def prompt_features(model: list[torch.nn.Module], prompts: list[list[int]],
                    ctx: ParallelContext, *, micro_batch_size: int,
                    pooling: Literal["mean", "last"] = "mean") -> torch.Tensor:
    """(P, H) float32 features of ``prompts`` (token ids), equal on every rank of the replica
    (collective over its TP and PP groups)."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling {pooling!r}: mean or last")
    length = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
        mask[row, :len(prompt)] = 1.0
    last_chunk = unwrap_model(model[-1])
    hidden_size = last_chunk.config.hidden_size
    captured: list[torch.Tensor] = []
    hook = None
    if ctx.is_last_stage:
        hook = last_chunk.decoder.final_layernorm.register_forward_hook(
            lambda module, args, output: captured.append(output.detach()))

    def pool_on_last_stage(output, micro_batch):
        hidden = captured.pop()  # (s, b, h), split along s under sequence parallelism
        if last_chunk.config.sequence_parallel and ctx.tp_size > 1:
            parts = [torch.empty_like(hidden) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, hidden.contiguous(), group=ctx.tp_group)
            hidden = torch.cat(parts)
        pooled = pool_hidden(hidden.transpose(0, 1).float(), micro_batch.completion_mask,
                             pooling)
        return output.sum() * 0.0, torch.tensor(1, dtype=torch.int, device=output.device), {
            "features": pooled}

    try:
        logs = _forward_only(
            model, SequenceBatch(tokens, mask, {}), pool_on_last_stage, ctx,
            micro_batch_size=micro_batch_size_for(len(prompts), micro_batch_size))
    finally:
        if hook is not None:
            hook.remove()
    if ctx.is_last_stage:
        features = torch.cat([log["features"] for log in logs]).float()
    else:
        features = torch.empty(len(prompts), hidden_size, dtype=torch.float32,
                               device=ctx.device)
    return broadcast_from_last_stage(features, ctx).cpu()
