"""A learned log-Z head: log Z_phi(x) = MLP(feature(x)), trained by the TB gradient.

The paper's log Z is a function of the prompt (a 3-layer MLP over prompt embeddings), not a
free number per prompt; a function generalizes to prompts never drawn and shares what it
learns between similar prompts. Here the head reads the prompt features of
:mod:`megatron_paced.paced.features` and outputs log Z on the 1/beta scale, the MLP on the
accuracy scale (so that its learning rate does not depend on beta)::

    log_z(x) = (init_acc + MLP(feature(x))) / beta      (the last layer starts at zero)

It is trained by the gradient that reaches ``log_z`` in the loss, ``d loss / d log_z =
2 delta`` per sample, normalized per prompt as the table's is: each prompt's mean over its
fresh samples (the caller's :func:`~megatron_paced.paced.log_z.per_prompt_mean`), then the
mean over the step's prompts on all DP ranks (an all-reduce of the summed parameter
gradients and the prompt count). Every rank of the DP group sees the same update, so the
replicated parameters stay equal; the head has its own Adam optimizer.

Usage::

    head = LogZHead(feature_dim=64, width=128, beta=0.05, init_acc=0.5, lr=1e-3)
    log_z = head(features[rows])                          # (B,), on the 1/beta scale
    prompts, mean_grads = per_prompt_mean(rows, grads)
    head.step(features[prompts], mean_grads, dp_group=ctx.dp_group)   # collective
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LogZHead(nn.Module):
    """MLP(feature) -> log Z on the 1/beta scale, with its optimizer."""

    def __init__(self, feature_dim: int, *, width: int = 128, num_layers: int = 3,
                 beta: float, init_acc: float, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"--log-z-head-layers {num_layers}: must be >= 1")
        generator = torch.Generator().manual_seed(seed)  # the same weights on every rank
        dims = [feature_dim] + [width] * (num_layers - 1) + [1]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            linear = nn.Linear(fan_in, fan_out, dtype=torch.float64)
            with torch.no_grad():
                bound = 1.0 / fan_in ** 0.5
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.zero_()
                if i == num_layers - 1:
                    linear.weight.zero_()  # log Z starts at init_acc / beta everywhere
            layers += [linear] + ([nn.GELU()] if i < num_layers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        self.beta, self.init_acc = float(beta), float(init_acc)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, F) features -> (n,) log Z on the 1/beta scale."""
        return (self.init_acc + self.mlp(features.double()).squeeze(-1)) / self.beta

    @torch.no_grad()
    def acc_est(self, features: torch.Tensor) -> torch.Tensor:
        """beta * log Z of each prompt, float64."""
        return self.beta * self(features)

    def step(self, prompt_features: torch.Tensor, prompt_grads: torch.Tensor, *,
             dp_group: dist.ProcessGroup | None = None) -> int:
        """One optimizer step (collective over ``dp_group``): ``prompt_grads[i]`` is the mean
        d loss / d log_z of the prompt whose feature is ``prompt_features[i]`` (distinct
        prompts; a rank may have none). Returns the number of prompts (all DP ranks) the step
        averaged over."""
        self.optimizer.zero_grad(set_to_none=False)
        if len(prompt_grads):
            (self(prompt_features) * prompt_grads.double()).sum().backward()
        for p in self.parameters():  # a rank with no prompt yet has no .grad
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in self.parameters()]
                         + [torch.tensor([float(len(prompt_grads))], dtype=torch.float64)])
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(flat, group=dp_group)
        count = float(flat[-1])
        if count == 0:
            return 0
        offset = 0
        for p in self.parameters():
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p) / count)
            offset += p.numel()
        self.optimizer.step()
        return int(count)
