"""The trainable policy and the frozen reference, on the same TP/PP layout.

* :class:`Policy`: this rank's stage of a ``GPTModel`` wrapped in Megatron's
  ``DistributedDataParallel`` (contiguous fp32 grad buffers, reduce-scatter for the
  distributed optimizer) with Megatron's optimizer (``get_megatron_optimizer``: the
  distributed optimizer shards Adam state and fp32 main weights over DP). Gradient
  finalization (DP reduction, tied-embedding sync across PP stages, division by the global
  item count) is Megatron's ``finalize_model_grads`` with our process groups.
* :class:`Reference`: the same architecture and layout, no grads, ``eval()``; it can be
  parked in host memory between uses (``park()``/``unpark()``) to free GPU memory for
  rollouts. It starts as a copy of the policy's weights (shard for shard, no communication).

Both run batches through Megatron's schedule (:mod:`megatron_paced.forward_backward`) in
micro-batches of --micro-batch-size (or the largest size below it that divides the batch):
``log_probs(batch)`` (no grad, on every PP stage) and ``forward_backward(batch, loss_fn)``.

Usage::

    policy = build_policy(model_cfg, optim_cfg, ctx, seed=1234, micro_batch_size=2)
    policy.zero_grad()
    logs = policy.forward_backward(batch, loss_fn)      # the loss logs of each micro-batch
    grad_norm = policy.step().grad_norm
    reference = build_reference(model_cfg, ctx, seed=1234, copy_from=policy)
    reference.log_probs(batch).token_log_probs          # (B, T)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_paced.config import OptimizerConfig
from megatron_paced.forward_backward import (
    LogProbs, LossFn, SequenceBatch, compute_log_probs, forward_backward, micro_batch_size_for,
)
from megatron_paced.models.config import ModelConfig
from megatron_paced.models.gpt import build_gpt_model
from megatron_paced.models.proj_z import PREFIX as PROJ_Z_PREFIX, attach_proj_z
from megatron_paced.models.sharding import unwrap_model
from megatron_paced.parallel import ParallelContext


@dataclass
class StepResult:
    """What one optimizer step reports."""

    update_successful: bool
    grad_norm: float
    num_zeros_in_grad: int | None


class ModelRunner:
    """This rank's model stage(s) on its layout, run through Megatron's schedule."""

    def __init__(self, model: list[torch.nn.Module], model_cfg: ModelConfig,
                 ctx: ParallelContext, micro_batch_size: int) -> None:
        self.model = model
        self.model_cfg = model_cfg
        self.ctx = ctx
        self.micro_batch_size = micro_batch_size
        """--micro-batch-size: the largest micro-batch of a pass."""

    def micro_batch_size_for(self, batch: SequenceBatch) -> int:
        return micro_batch_size_for(batch.num_sequences, self.micro_batch_size)

    def log_probs(self, batch: SequenceBatch) -> LogProbs:
        """Token and sequence log-probs of ``batch``'s completions (no grad, eval mode), on
        every rank of the pipeline."""
        return compute_log_probs(self.model, batch.sequences(), self.ctx,
                                 vocab_size=self.model_cfg.vocab_size,
                                 micro_batch_size=self.micro_batch_size_for(batch))

    def forward_backward(self, batch: SequenceBatch, loss_fn: LossFn) -> list[dict]:
        """``loss_fn`` over ``batch``'s micro-batches, gradients accumulated into the model;
        the loss logs of each micro-batch (on the last stage; empty elsewhere)."""
        return forward_backward(self.model, batch, loss_fn, self.ctx,
                                vocab_size=self.model_cfg.vocab_size,
                                micro_batch_size=self.micro_batch_size_for(batch))


def local_grad_sq_norm(model: list[torch.nn.Module], ctx: ParallelContext) -> float:
    """The squared norm of the gradient in this rank's grad buffers over the whole model (TP
    and PP shards summed, TP duplicates and shared copies counted once, as Megatron's grad
    norm counts them; collective over TP and PP)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    sq = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    for chunk in model:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is not None and param_is_not_shared(param) and \
                    param_is_not_tensor_parallel_duplicate(param, ctx.tp_group):
                sq += grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=ctx.tp_group)
    dist.all_reduce(sq, group=ctx.pp_group)
    return float(sq)


@dataclass
class LocalGradients:
    """The small-batch gradient of the last backward pass, what the gradient noise scale
    reads (:mod:`megatron_paced.rl.noise_scale`), as its squared norm and item count. Which
    small batch (``small_batch``):

    * ``"dp-rank"`` (DP > 1): this DP rank's local mean gradient before Megatron reduced it
      over DP, recorded by the gradient-finalization hook. With several pipeline stages and
      tied embeddings the output layer's share of the embedding's gradient reaches the local
      gradient only in the reduction, so it is missing there.
    * ``"micro-batch"`` (one DP rank, no pipeline): the first micro-batch's gradient, read
      from the grad buffers as the second micro-batch's forward step starts (no extra pass;
      the optimization stage shuffles the rows first, so it is a random subset of them).
    * ``None``: not recorded (one DP rank with a pipeline, or the noise scale not logged).

    Recording costs a norm over every gradient and a few small all-reduces per pass."""

    small_batch: str | None = None
    sq_norm: float = float("nan")
    num_items: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.small_batch is not None

    def record(self, model: list[torch.nn.Module], num_tokens, ctx: ParallelContext) -> None:
        sq = local_grad_sq_norm(model, ctx)
        items = torch.tensor([float(num_tokens)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(items, op=dist.ReduceOp.MAX, group=ctx.pp_group)  # the last stage's
        self.num_items = float(items)
        self.sq_norm = sq / max(self.num_items, 1.0) ** 2

    def first_micro_batch_hook(self, model: list[torch.nn.Module], ctx: ParallelContext):
        """``before_micro_batch`` of :func:`forward_backward`: the buffers' norm at micro-batch
        1 (micro-batch 0's gradient, a sum over its items; :meth:`count_first` divides)."""
        self.sq_norm, self.num_items = float("nan"), 0.0

        def hook(index: int) -> None:
            if index == 1:
                self.sq_norm = local_grad_sq_norm(model, ctx)
        return hook

    def count_first(self, logs: list[dict]) -> None:
        """Micro-batch 0's item count from the pass's loss logs; |G_b|^2 per item."""
        if len(logs) > 1:
            self.num_items = float(logs[0].get("num_sequences", logs[0].get("num_tokens")))
            self.sq_norm /= max(self.num_items, 1.0) ** 2


def small_batch_for(ctx: ParallelContext) -> str | None:
    """Which small batch the noise scale compares with on this layout (:class:`LocalGradients`)."""
    if ctx.dp_size > 1:
        return "dp-rank"
    return "micro-batch" if ctx.pp_size == 1 else None


class Policy(ModelRunner):
    """The trainable model stage(s) of this rank with their optimizer."""

    def __init__(self, model: list[torch.nn.Module], optimizer, model_cfg: ModelConfig,
                 ctx: ParallelContext, micro_batch_size: int = 1,
                 local_gradients: LocalGradients | None = None) -> None:
        super().__init__(model, model_cfg, ctx, micro_batch_size)
        self.optimizer = optimizer
        self.local_gradients = local_gradients or LocalGradients()
        """This DP rank's gradient of the last backward pass, before the DP reduction."""

    def forward_backward(self, batch: SequenceBatch, loss_fn: LossFn) -> list[dict]:
        if self.local_gradients.small_batch != "micro-batch":
            return super().forward_backward(batch, loss_fn)
        logs = forward_backward(self.model, batch, loss_fn, self.ctx,
                                vocab_size=self.model_cfg.vocab_size,
                                micro_batch_size=self.micro_batch_size_for(batch),
                                before_micro_batch=self.local_gradients.first_micro_batch_hook(
                                    self.model, self.ctx))
        self.local_gradients.count_first(logs)
        return logs

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> StepResult:
        """Apply the accumulated gradients; returns the global grad norm (before clipping)."""
        update_successful, grad_norm, num_zeros = self.optimizer.step()
        return StepResult(bool(update_successful), float(grad_norm or 0.0), num_zeros)

    def modules(self) -> list[torch.nn.Module]:
        """The bare GPTModel stages, without the DDP wrapper."""
        return [chunk.module for chunk in self.model]


def _megatron_optimizer_config(optim_cfg: OptimizerConfig, params_dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    return MegatronOptimizerConfig(
        optimizer=optim_cfg.optimizer,
        lr=optim_cfg.lr,
        min_lr=optim_cfg.lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        sgd_momentum=optim_cfg.sgd_momentum,
        clip_grad=optim_cfg.clip_grad,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
    )


def build_policy(
    model_cfg: ModelConfig,
    optim_cfg: OptimizerConfig,
    ctx: ParallelContext,
    *,
    seed: int,
    params_dtype: torch.dtype = torch.float32,
    proj_z_layers: int = 0,
    proj_z_dropout: float = 0.0,
    micro_batch_size: int = 1,
    record_local_gradients: bool = False,
) -> Policy:
    """Build this rank's policy stage with Megatron DDP and the (distributed) optimizer;
    with ``proj_z_layers`` the last stage carries FlowRL's log-Z head
    (:mod:`megatron_paced.models.proj_z`), trained with it. ``record_local_gradients``: keep
    each backward pass's small-batch gradient norm (:class:`LocalGradients`, the noise
    scale's)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import get_megatron_optimizer

    optim_cfg.validate()
    gpt = build_gpt_model(model_cfg, ctx, seed=seed, params_dtype=params_dtype)
    if proj_z_layers:
        attach_proj_z(gpt, num_layers=proj_z_layers, dropout=proj_z_dropout, seed=seed)
    config = gpt.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt,
                                  pg_collection=ctx.pg)
    ddp.broadcast_params()  # identical replicas across DP, whatever happened at init
    local_gradients = LocalGradients(small_batch_for(ctx) if record_local_gradients else None)
    config.finalize_model_grads_func = partial(_finalize_model_grads, finalize_model_grads,
                                               local_gradients, ctx)
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        _megatron_optimizer_config(optim_cfg, params_dtype), [ddp], pg_collection=ctx.pg,
        # Megatron refuses its extra gloo groups with explicit process groups; on the CPU the
        # main groups are gloo already.
        use_gloo_process_groups=False,
    )
    return Policy([ddp], optimizer, model_cfg, ctx, micro_batch_size, local_gradients)


def _finalize_model_grads(finalize, local_gradients, ctx, model, num_tokens, pg_collection=None,
                          force_all_reduce=False):
    # The schedule passes its own pg_collection, which is ours (forward_backward passes ctx.pg).
    # The local gradient first: the reduction below replaces it (and num_tokens, summed).
    if local_gradients.small_batch == "dp-rank" and num_tokens is not None:
        local_gradients.record(model, num_tokens, ctx)
    return finalize(model, num_tokens, pg_collection=pg_collection,
                    force_all_reduce=force_all_reduce)


class Reference(ModelRunner):
    """A frozen copy of the model for KL terms, optionally parked in host memory."""

    def __init__(self, model: list[torch.nn.Module], model_cfg: ModelConfig,
                 ctx: ParallelContext, micro_batch_size: int = 1) -> None:
        super().__init__(model, model_cfg, ctx, micro_batch_size)
        self.parked = False

    @torch.no_grad()
    def copy_from(self, policy: "Policy") -> None:
        """Take the policy's current weights (same layout): the base of the KL terms."""
        self.unpark()
        for mine, theirs in zip(self.model, policy.modules()):
            source = dict(unwrap_model(theirs).named_parameters())
            for name, param in unwrap_model(mine).named_parameters():
                param.copy_(source[name])

    def park(self) -> None:
        """Move the weights to host memory (no-op on a CPU run)."""
        if self.ctx.device.type != "cpu" and not self.parked:
            for chunk in self.model:
                chunk.to("cpu")
            self.parked = True

    def unpark(self) -> None:
        """Bring the weights back to the device before use."""
        if self.parked:
            for chunk in self.model:
                chunk.to(self.ctx.device)
            self.parked = False


def build_reference(
    model_cfg: ModelConfig,
    ctx: ParallelContext,
    *,
    seed: int,
    copy_from: Policy | None = None,
    params_dtype: torch.dtype = torch.float32,
    micro_batch_size: int = 1,
) -> Reference:
    """The frozen reference on the same layout; a copy of ``copy_from``'s weights if given."""
    gpt = build_gpt_model(model_cfg, ctx, seed=seed, params_dtype=params_dtype)
    if copy_from is not None:
        source = {name: value for name, value in copy_from.modules()[0].state_dict().items()
                  if not name.startswith(PROJ_Z_PREFIX)}  # the reference has no log-Z head
        gpt.load_state_dict(source, strict=True)
    gpt.eval()
    for param in gpt.parameters():
        param.requires_grad_(False)
    return Reference([gpt], model_cfg, ctx, micro_batch_size)
