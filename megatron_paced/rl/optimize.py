"""The optimization stage of one RL step: the loss through Megatron's schedule, the policy's
optimizer step and the log-Z table's step.

The batch's rows read their log-Z (on the 1/beta scale) from the sharded table with gradients
on; ``forward_backward`` runs the loss on every micro-batch (PP: 1F1B) and Megatron's DDP
reduces the policy's gradients; the loss and its item count are summed over micro-batches,
broadcast from the last pipeline stage and all-reduced over DP, so every rank reports the same
loss; the policy steps, then the table applies the gradient its fresh rows received (an
all-to-all to their owners; rows with ``updates_log_z`` false, the replayed ones, do not
move the table). The batch it is given is not changed: the loss reads a copy with ``log_z``.
A loss that raises (a NaN reward) or is not finite stops the run before any update, naming
the step and the prompts.

Usage::

    loss_fn = loss_fn_for(job.algorithm)         # paced, grpo or flowrl, with its coefficients
    result = optimize_step(policy, log_z, batch, loss_fn, ctx, train_log_z=True, step=12,
                           prompt_ids_of=lambda rows: rows)
    result.loss, result.grad_norm, result.kl_old_theta, result.log_z_seconds
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_paced import losses
from megatron_paced.parallel import broadcast_from_last_stage
from megatron_paced.rl.batch import RLBatch, split_for_steps
from megatron_paced.rl.collect import stop_error
from megatron_paced.rl.noise_scale import noise_scale_terms


@dataclass
class StepResult:
    loss: float
    """The loss per item (sequence or token, as the loss counts them), over all DP ranks."""
    grad_norm: float
    kl_old_theta: float
    """Mean S_old - S_theta the loss saw, at the weights before this update (0 if it reports
    none): zero on rows whose pi_old is the recompute, so it measures the anchor's mismatch
    (engine log-probs, replayed rows' generation-time log-probs), not the premise of
    Proposition 4.1; that is ``beta_kl_old_new``, after the update."""
    log_z_seconds: float
    """Time spent applying the log-Z gradient (PACED's bookkeeping)."""
    noise: list = dataclasses.field(default_factory=list)
    """(|G|^2, tr Sigma, B) of each optimizer step's gradient, B the items it counted over all
    DP ranks (:mod:`megatron_paced.rl.noise_scale`; none where there is no smaller batch)."""
    num_items: float = 0.0
    """Items the loss counted over all DP ranks and optimizer steps."""

    def metrics(self) -> dict:
        return {"loss": self.loss, "grad_norm": self.grad_norm,
                "kl_old_theta": self.kl_old_theta}


def loss_fn_for(algorithm) -> Callable:
    """The loss of ``--algo`` with its coefficients (an :class:`AlgorithmConfig`)."""
    if algorithm.algo == "paced":
        return functools.partial(losses.paced_loss_fn, beta=algorithm.beta)
    if algorithm.algo == "flowrl":
        return functools.partial(losses.flowrl_loss_fn, reward_scale=algorithm.flowrl_reward_scale,
                                 reward=algorithm.flowrl_reward,
                                 weight_max=algorithm.flowrl_weight_max)
    return functools.partial(losses.grpo_loss_fn, kl_coef=algorithm.grpo_kl_coef)


def log_z_step(log_z, batch: RLBatch, grads: torch.Tensor) -> int:
    """The table's step (collective over DP): ``grads`` (B,) are d loss_sum / d log_z of the
    batch's rows; only rows with ``updates_log_z`` (the fresh ones) reach the table. Returns
    the rows updated on this rank."""
    keep = batch.updates_log_z
    return log_z.apply_gradients(batch.log_z_rows[keep], grads[keep])


def optimize_step(policy, log_z, batch: RLBatch, loss_fn, ctx, *, train_log_z: bool,
                  step: int, prompt_ids_of: Callable[[list[int]], list] = list,
                  num_steps: int = 1, num_fresh: int | None = None,
                  group_size: int = 1) -> StepResult:
    """``num_steps`` optimizer steps of the policy (and of the log-Z table if
    ``train_log_z``) on ``batch``, one per mini-batch of :func:`split_for_steps` (its first
    ``num_fresh`` rows are groups of ``group_size``; collective; micro-batches of the
    policy's --micro-batch-size): every mini-batch keeps the batch's anchor pi_old, so after
    the first one the policy has moved away from it. ``prompt_ids_of`` maps log-Z rows to the
    dataset prompt ids an error names. The result sums the steps' items: the loss and
    ``kl_old_theta`` per item over all of them, the mean grad norm."""
    minis = split_for_steps(batch, num_steps, num_fresh=batch.num_sequences if num_fresh
                            is None else num_fresh, group_size=group_size)
    if policy.local_gradients.small_batch == "micro-batch":  # its first micro-batch: random rows
        order = torch.Generator().manual_seed(step)
        minis = [mini.select(torch.randperm(mini.num_sequences, generator=order))
                 for mini in minis]
    steps = [_optimizer_step(policy, log_z, mini, loss_fn, ctx, train_log_z=train_log_z,
                             step=step, prompt_ids_of=prompt_ids_of) for mini in minis]
    items = sum(s.num_items for s in steps)
    return StepResult(sum(s.loss * s.num_items for s in steps) / max(items, 1),
                      sum(s.grad_norm for s in steps) / len(steps),
                      sum(s.kl_old_theta * s.num_items for s in steps) / max(items, 1),
                      sum(s.log_z_seconds for s in steps),
                      [term for s in steps for term in s.noise], items)


def _optimizer_step(policy, log_z, batch: RLBatch, loss_fn, ctx, *, train_log_z: bool,
                    step: int, prompt_ids_of: Callable[[list[int]], list]) -> StepResult:
    rows = batch.log_z_rows

    def stop(err) -> FloatingPointError:  # naming each prompt of the batch once
        return stop_error(step, err, prompt_ids_of(list(dict.fromkeys(rows.tolist()))))

    log_z_rows = log_z.lookup(rows).requires_grad_(True)
    policy.zero_grad()
    try:
        logs = policy.forward_backward(dataclasses.replace(batch, log_z=log_z_rows), loss_fn)
    except FloatingPointError as err:  # raised by the loss before any update
        raise stop(err) from None
    totals = torch.zeros(3, dtype=torch.float64)
    for log in logs:
        totals += torch.stack([log["loss_sum"].double().cpu(),
                               log.get("num_sequences", log.get("num_tokens")).double().cpu(),
                               log.get("kl_old_theta_sum", torch.zeros(())).double().cpu()])
    totals = broadcast_from_last_stage(totals, ctx)
    dist.all_reduce(totals, group=ctx.dp_group)
    loss = float(totals[0] / totals[1].clamp(min=1))
    if not math.isfinite(loss):
        raise stop(f"non-finite loss {loss}")
    result = policy.step()
    seconds = 0.0
    if train_log_z:
        grads = log_z_rows.grad if log_z_rows.grad is not None else torch.zeros_like(log_z_rows)
        grads = broadcast_from_last_stage(grads.detach().clone(), ctx)
        start = time.perf_counter()
        log_z_step(log_z, batch, grads)
        seconds = time.perf_counter() - start
    terms = local_noise_terms(policy, result.grad_norm, float(totals[1]), ctx)
    return StepResult(loss, result.grad_norm, float(totals[2] / totals[1].clamp(min=1)), seconds,
                      [] if terms is None else [(*terms, float(totals[1]))], float(totals[1]))


def local_noise_terms(policy, grad_norm: float, num_items: float, ctx):
    """The step's (|G|^2, tr Sigma) from the small batches' gradients (every DP rank's local
    one, collective over DP; or the first micro-batch's) and the reduced one; None where
    there is no smaller batch (one DP rank with a pipeline or a single micro-batch) or the
    policy does not record it."""
    small = policy.local_gradients
    if small.small_batch == "micro-batch":
        if not 0 < small.num_items < num_items:
            return None
        return noise_scale_terms(torch.tensor([small.sq_norm]), torch.tensor([small.num_items]),
                                 grad_norm ** 2, num_items)
    if small.small_batch != "dp-rank":
        return None
    local = torch.tensor([small.sq_norm, small.num_items], dtype=torch.float64)
    ranks = [torch.empty_like(local) for _ in range(ctx.dp_size)]
    dist.all_gather(ranks, local, group=ctx.dp_group)
    every = torch.stack(ranks)
    return noise_scale_terms(every[:, 0], every[:, 1], grad_norm ** 2, num_items)
