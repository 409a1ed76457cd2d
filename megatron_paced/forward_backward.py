"""Run a batch of sequences through Megatron's pipeline schedule: log-probs, losses, gradients.

A :class:`SequenceBatch` is this data-parallel rank's share of the step: right-padded token
ids and a mask of the completion tokens to score; a subclass names the per-sequence tensors
a loss needs (:class:`~megatron_paced.rl.batch.RLBatch`: rewards, old log-probs, log Z).
:func:`forward_backward` cuts it into micro-batches and hands them to
``get_forward_backward_func()`` -- the no-pipelining loop for PP1, 1F1B for PP > 1 -- so PP
works unchanged. On the last stage each micro-batch's vocab-parallel logits
become token log-probs (:mod:`megatron_paced.logprobs`) and go to a loss with Megatron's
contract::

    loss_fn(token_log_probs (b, T), micro_batch) -> (loss_sum, num_items, logs)

``loss_sum`` is a sum over items (tokens or sequences, the loss says which in its
docstring); Megatron divides the gradients once by the global ``num_items`` summed over
micro-batches and DP ranks (``calculate_per_token_loss=True``), so the gradient does not
depend on how the batch was split.

:func:`compute_log_probs` is the no-grad case: it returns the (B, T) token log-probs and the
(B,) completion sums on every rank of the pipeline (broadcast from the last stage).

Usage::

    batch = SequenceBatch(tokens, completion_mask).shard_for_dp(ctx.dp_rank, ctx.dp_size)
    result = compute_log_probs(model, batch, ctx, vocab_size=cfg.vocab_size,
                               micro_batch_size=2)
    logs = forward_backward(model, batch, nll_loss, ctx, vocab_size=cfg.vocab_size,
                            micro_batch_size=2)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_paced.logprobs import next_token_log_probs, sequence_log_probs
from megatron_paced.models.proj_z import has_proj_z, prompt_log_z
from megatron_paced.models.sharding import unwrap_model
from megatron_paced.parallel import ParallelContext, broadcast_from_last_stage

LossFn = Callable[[torch.Tensor, "SequenceBatch"], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass
class SequenceBatch:
    """Sequences of one step on one DP rank; every tensor's first dimension is the sequence.

    A subclass adds named per-sequence tensors (:class:`~megatron_paced.rl.batch.RLBatch`,
    :class:`~megatron_paced.rollout.engine.RolloutBatch`); slicing, moving and sharding
    carry every tensor field along (a field left ``None`` stays ``None``)."""

    tokens: torch.Tensor
    """(B, T) int64 token ids, prompt then completion, right-padded."""
    completion_mask: torch.Tensor
    """(B, T) float, 1 on the completion tokens whose log-probs count."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.completion_mask.shape:
            raise ValueError(
                f"tokens {tuple(self.tokens.shape)} and completion_mask "
                f"{tuple(self.completion_mask.shape)} must both be (B, T)"
            )
        for name, value in self.tensors().items():
            if value.shape[0] != self.tokens.shape[0]:
                raise ValueError(f"{type(self).__name__}.{name} has {value.shape[0]} rows, "
                                 f"tokens {self.tokens.shape[0]}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch's per-sequence tensors by field name (``None`` fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def sequences(self) -> "SequenceBatch":
        """Only the tokens and the mask (what a forward pass reads)."""
        return SequenceBatch(self.tokens, self.completion_mask)

    def rows(self, start: int, stop: int) -> "SequenceBatch":
        """Rows ``[start, stop)`` of every tensor, as the same kind of batch."""
        return dataclasses.replace(
            self, **{name: value[start:stop] for name, value in self.tensors().items()})

    def select(self, rows: torch.Tensor) -> "SequenceBatch":
        """The given rows (int64 indices) of every tensor, as the same kind of batch."""
        return dataclasses.replace(
            self, **{name: value[rows] for name, value in self.tensors().items()})

    def to(self, device: torch.device) -> "SequenceBatch":
        return dataclasses.replace(
            self, **{name: value.to(device) for name, value in self.tensors().items()})

    def shard_for_dp(self, dp_rank: int, dp_size: int) -> "SequenceBatch":
        """This DP rank's contiguous share of a global batch (B must divide by dp_size)."""
        if self.num_sequences % dp_size != 0:
            raise ValueError(f"global batch of {self.num_sequences} sequences does not divide "
                             f"by the data-parallel size {dp_size}")
        per_rank = self.num_sequences // dp_size
        return self.rows(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    def micro_batches(self, micro_batch_size: int) -> list["SequenceBatch"]:
        if self.num_sequences % micro_batch_size != 0:
            raise ValueError(f"--micro-batch-size {micro_batch_size} does not divide the "
                             f"{self.num_sequences} sequences of this rank's batch")
        return [self.rows(i, i + micro_batch_size)
                for i in range(0, self.num_sequences, micro_batch_size)]


def micro_batch_size_for(num_sequences: int, largest: int) -> int:
    """``largest`` (--micro-batch-size), or the largest size below it that divides the batch
    (smaller while the replay buffer fills); the loss is normalized per item, so the gradient
    does not depend on the split."""
    size = largest
    while num_sequences % size:
        size -= 1
    return size


LastStageFn = Callable[[torch.Tensor, SequenceBatch], tuple[torch.Tensor, torch.Tensor, dict]]


def _forward_step(
    data_iterator: Iterator[SequenceBatch], model: torch.nn.Module, *,
    last_stage_fn: LastStageFn,
):
    micro_batch = next(data_iterator)
    tokens = micro_batch.tokens
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # Causal attention with right padding: real tokens never attend to the padding after them.
    output = model(tokens, position_ids, None)
    return output, partial(last_stage_fn, micro_batch=micro_batch)


def _announced(micro_batches: list[SequenceBatch], before_micro_batch: Callable[[int], None]):
    for index, micro_batch in enumerate(micro_batches):
        before_micro_batch(index)  # inside micro-batch ``index``'s forward step
        yield micro_batch


def _run_schedule(
    model: list[torch.nn.Module], batch: SequenceBatch, last_stage_fn: LastStageFn,
    ctx: ParallelContext, *, micro_batch_size: int, forward_only: bool,
    before_micro_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    micro_batches = batch.to(ctx.device).micro_batches(micro_batch_size)
    config = unwrap_model(model[0]).config
    extra = {}
    if ctx.pp_size > 1:
        extra["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pp_group, config=config)
    forward_backward_func = get_forward_backward_func(pp_size=ctx.pp_size)
    return forward_backward_func(
        forward_step_func=partial(_forward_step, last_stage_fn=last_stage_fn),
        data_iterator=(iter(micro_batches) if before_micro_batch is None
                       else _announced(micro_batches, before_micro_batch)),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=batch.seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        pg_collection=ctx.pg,
        **extra,
    )


@contextlib.contextmanager
def final_hidden_states(model: list[torch.nn.Module], ctx: ParallelContext, *, detach: bool):
    """Collect the last stage's final-norm output, (s, b, h) per micro-batch in schedule order
    (what the output layer reads; split along s under sequence parallelism), in a list that
    the last-stage function pops from; empty on other stages."""
    captured: list[torch.Tensor] = []
    hook = None
    if ctx.is_last_stage:
        hook = unwrap_model(model[-1]).decoder.final_layernorm.register_forward_hook(
            lambda module, args, output: captured.append(output.detach() if detach else output))
    try:
        yield captured
    finally:
        if hook is not None:
            hook.remove()


def _loss_on_last_stage(logits: torch.Tensor, micro_batch: SequenceBatch, *, loss_fn: LossFn,
                        ctx: ParallelContext, vocab_size: int, proj_z=None,
                        hidden: list[torch.Tensor] | None = None):
    if proj_z is not None:  # FlowRL's head: log Z from this micro-batch's prompt states

        log_z = prompt_log_z(proj_z, hidden.pop(0), micro_batch.completion_mask, ctx)
        if "log_z" in {f.name for f in dataclasses.fields(micro_batch)}:  # an RL batch
            micro_batch = dataclasses.replace(micro_batch, log_z=log_z)
    token_log_probs = next_token_log_probs(
        logits, micro_batch.tokens, tp_group=ctx.tp_group,
        vocab_start=ctx.tp_rank * logits.shape[-1], vocab_size=vocab_size,
    )
    return loss_fn(token_log_probs, micro_batch)


def forward_backward(
    model: list[torch.nn.Module],
    batch: SequenceBatch,
    loss_fn: LossFn,
    ctx: ParallelContext,
    *,
    vocab_size: int,
    micro_batch_size: int,
    forward_only: bool = False,
    before_micro_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """One pass of ``batch`` through the pipeline schedule; returns the loss logs of each
    micro-batch (on the last stage; empty elsewhere). Gradients are accumulated into the
    model (DDP grad buffers) unless ``forward_only``. A model whose last stage carries
    FlowRL's head (:mod:`megatron_paced.models.proj_z`) gives the loss its ``log_z`` from
    the head, in place of the batch's. ``before_micro_batch(k)`` is called as micro-batch k's
    forward step starts (without a pipeline: after the backward passes of micro-batches
    0..k-1, so the grad buffers hold their gradient)."""

    last_chunk = unwrap_model(model[-1])
    proj_z = last_chunk.proj_z if ctx.is_last_stage and has_proj_z(last_chunk) else None
    capture = (final_hidden_states(model, ctx, detach=False) if proj_z is not None
               else contextlib.nullcontext(None))
    with capture as hidden:
        last_stage_fn = partial(_loss_on_last_stage, loss_fn=loss_fn, ctx=ctx,
                                vocab_size=vocab_size, proj_z=proj_z, hidden=hidden)
        return _run_schedule(model, batch, last_stage_fn, ctx,
                             micro_batch_size=micro_batch_size, forward_only=forward_only,
                             before_micro_batch=before_micro_batch)


def _keep_log_probs(logits: torch.Tensor, micro_batch: SequenceBatch, *, ctx: ParallelContext,
                    vocab_size: int):
    token_log_probs, is_argmax = next_token_log_probs(
        logits, micro_batch.tokens, tp_group=ctx.tp_group,
        vocab_start=ctx.tp_rank * logits.shape[-1], vocab_size=vocab_size, return_is_argmax=True,
    )
    masked = token_log_probs * micro_batch.completion_mask
    no_loss = masked.sum() * 0.0
    return no_loss, torch.tensor(1, dtype=torch.int, device=masked.device), {
        "token_log_probs": masked.detach(), "is_argmax": is_argmax}


@dataclass
class LogProbs:
    """Log-probs of one batch's completions, on every rank of the pipeline."""

    token_log_probs: torch.Tensor
    """(B, T) log p(token_t | tokens_<t), 0 outside the completion mask."""
    sequence_log_probs: torch.Tensor
    """(B,) sum of the completion tokens' log-probs, S(y|x)."""
    is_argmax: torch.Tensor
    """(B, T) bool: the token is the model's argmax given its prefix (greedy decoding's pick)."""

    def greedy_matches(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """(B,) bool: greedy decoding from the prompt reproduces the whole completion."""
        return (self.is_argmax | (completion_mask == 0)).all(dim=-1)


def forward_eval(model: list[torch.nn.Module], batch: SequenceBatch,
                 last_stage_fn: LastStageFn, ctx: ParallelContext, *,
                 micro_batch_size: int) -> list[dict]:
    """The schedule's forward pass in eval mode (the model is put back in train mode)."""
    for chunk in model:
        chunk.eval()
    try:
        return _run_schedule(model, batch, last_stage_fn, ctx,
                             micro_batch_size=micro_batch_size, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()


@torch.no_grad()
def compute_log_probs(
    model: list[torch.nn.Module], batch: SequenceBatch, ctx: ParallelContext, *,
    vocab_size: int, micro_batch_size: int,
) -> LogProbs:
    """Token and sequence log-probs of ``batch`` (no grad), available on all PP stages."""
    logs = forward_eval(model, batch, partial(_keep_log_probs, ctx=ctx, vocab_size=vocab_size),
                         ctx, micro_batch_size=micro_batch_size)
    if ctx.is_last_stage:
        token_log_probs = torch.cat([log["token_log_probs"] for log in logs]).float()
        is_argmax = torch.cat([log["is_argmax"] for log in logs]).float()
    else:
        token_log_probs = torch.empty(batch.tokens.shape, dtype=torch.float32,
                                      device=ctx.device)
        is_argmax = torch.empty_like(token_log_probs)
    both = broadcast_from_last_stage(torch.stack([token_log_probs, is_argmax]), ctx)
    token_log_probs, is_argmax = both[0], both[1]
    mask = batch.completion_mask.to(token_log_probs.device)
    return LogProbs(token_log_probs, sequence_log_probs(token_log_probs, mask), is_argmax > 0.5)


def _keep_logits(logits: torch.Tensor, micro_batch: SequenceBatch, *, ctx: ParallelContext,
                 vocab_size: int):
    shards = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    dist.all_gather(shards, logits.contiguous(), group=ctx.tp_group)
    full = torch.cat(shards, dim=-1)[..., :vocab_size]
    no_loss = logits.sum() * 0.0
    return no_loss, torch.tensor(1, dtype=torch.int, device=logits.device), {
        "logits": full.detach()}


@torch.no_grad()
def compute_logits(
    model: list[torch.nn.Module], batch: SequenceBatch, ctx: ParallelContext, *,
    vocab_size: int, micro_batch_size: int,
) -> torch.Tensor:
    """(B, T, vocab_size) float32 logits of ``batch`` (TP shards gathered, padding rows
    dropped), on every rank. For evaluation and checks of converted weights: it materializes
    the full vocabulary for every position."""
    logs = forward_eval(model, batch, partial(_keep_logits, ctx=ctx, vocab_size=vocab_size),
                         ctx, micro_batch_size=micro_batch_size)
    shape = (*batch.tokens.shape, vocab_size)
    logits = (torch.cat([log["logits"] for log in logs]).float() if ctx.is_last_stage
              else torch.empty(shape, dtype=torch.float32, device=ctx.device))
    return broadcast_from_last_stage(logits, ctx)
