"""FlowRL's log-partition head, ``ProjZ``: an MLP on the policy's own prompt hidden states,
trained with the policy by the same loss and optimizer.

FlowRL as published (arXiv 2509.15207; ``ProjZModule`` and ``_forward_micro_batch`` of
Xuekai-Zhu/FlowRL's verl actor) reads, for each sample, ::

    h(x)     = mean over the prompt's tokens t of h_L(x)_t      (the final norm's output)
    log Z(x) = W_L ... (LayerNorm(GELU(W_1 h(x) + b_1))) ...      (L linear layers, width H)

with gradients into both the MLP and the policy (the prompt's hidden states are not
detached), in the policy's optimizer and its gradient clip. Here the MLP is a submodule,
``proj_z``, of the last pipeline stage's ``GPTModel``, attached before Megatron's DDP and
optimizer are built, so its parameters are in the DDP buffers (gradients reduced over DP),
the (distributed) optimizer and ``dist_checkpointing``; they are replicated over TP (their
gradients are equal there: the final norm's output is). Its input is taken by a forward hook
on the final norm (:func:`prompt_log_z`), gathered over TP under sequence parallelism with a
backward that splits rather than sums (every TP rank computes the same loss).

Departures from the recipe, both documented flags: the initialization is drawn from
``--seed`` (torch's default init scheme, the same on every rank and layout) and
``--flowrl-proj-z-dropout`` defaults to 0 (the recipe: 0.1), because torch's dropout draws
from the process RNG, which a checkpoint does not hold (exact resume) and which differs
between DP layouts (layout invariance). The head's parameters are never sent to a rollout
engine and are not part of a Hugging Face export (:data:`PREFIX`).

Usage::

    gpt = build_gpt_model(model_cfg, ctx, seed=1)
    attach_proj_z(gpt, num_layers=3, dropout=0.0, seed=1)    # on the last stage only
    log_z = prompt_log_z(gpt.proj_z, hidden, completion_mask, ctx)   # (b,), with grad
"""

from __future__ import annotations

import math

import torch

PREFIX = "proj_z."
"""The parameter names of the head (local and global): skipped by weight sync and export."""


class ProjZ(torch.nn.Module):
    """(b, H) prompt states -> (b, 1) log Z: (Linear, GELU, LayerNorm, Dropout) x (L - 1),
    then Linear(H, 1)."""

    def __init__(self, hidden_size: int, num_layers: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [torch.nn.Linear(hidden_size, hidden_size), torch.nn.GELU(),
                       torch.nn.LayerNorm(hidden_size), torch.nn.Dropout(dropout)]
        layers.append(torch.nn.Linear(hidden_size, 1))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def reset_parameters_(self, seed: int) -> None:
        """torch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
        biases, LayerNorm at (1, 0), drawn from ``seed`` alone: the same on every rank."""
        generator = torch.Generator().manual_seed(seed)
        for module in self.net:
            if isinstance(module, torch.nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                for param in (module.weight, module.bias):
                    values = torch.rand(param.shape, generator=generator, dtype=torch.float64)
                    param.copy_((2 * values - 1) * bound)
            elif isinstance(module, torch.nn.LayerNorm):
                module.reset_parameters()


def attach_proj_z(gpt: torch.nn.Module, *, num_layers: int, dropout: float, seed: int) -> None:
    """Give the last pipeline stage of ``gpt`` (a bare GPTModel) its ``proj_z`` head, in the
    stage's dtype and device; other stages get none. Call before DDP wraps the model."""
    if not getattr(gpt, "post_process", True):
        return
    weight = next(gpt.parameters())
    head = ProjZ(gpt.config.hidden_size, num_layers=num_layers, dropout=dropout)
    head.reset_parameters_(seed)
    gpt.proj_z = head.to(device=weight.device, dtype=weight.dtype)


def prompt_mask(completion_mask: torch.Tensor) -> torch.Tensor:
    """(b, T) 0/1 mask of the prompt tokens: every position before the first completion
    token (right padding comes after the completion)."""
    return (torch.cumsum(completion_mask, dim=1) == 0).to(completion_mask.dtype)


def prompt_log_z(head: torch.nn.Module, hidden: torch.Tensor, completion_mask: torch.Tensor,
                 ctx) -> torch.Tensor:
    """(b,) float32 log Z of a micro-batch from the final norm's output ``hidden`` (s, b, H)
    (this TP rank's sequence chunk under sequence parallelism), with gradients into the head
    and the policy."""
    if ctx.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                      group=ctx.tp_group)
    mask = prompt_mask(completion_mask).to(hidden.dtype).transpose(0, 1)[..., None]  # (s, b, 1)
    pooled = (hidden * mask).sum(0) / mask.sum(0).clamp(min=1)
    return head(pooled).squeeze(-1).float()


def has_proj_z(model: torch.nn.Module) -> bool:
    """Whether this bare model stage carries FlowRL's head."""
    return isinstance(getattr(model, "proj_z", None), ProjZ)

