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

The log-Z head (:mod:`megatron_paced.paced.learned_log_z`) reads them through
:func:`log_z_features`: each DP rank pools the prompts of its block of rows (the table's
partition) and a share of the held-out prompts (gathered after), projects them to
``--log-z-feature-dim`` by a fixed random matrix, and standardizes every column over all
prompts (an all-reduce of sums). At 1e7 prompts and width 64 that is 256 bytes per prompt
(2.56 GB in all, split over the DP ranks, beside the table's 32). With
``--log-z-feature-cache`` they are written once per (base model, prompts, settings) with
``dist_checkpointing``, so they re-partition on another DP size.

Usage::

    features = prompt_features(reference.model, prompt_tokens, ctx, micro_batch_size=16)
    features.shape                      # (len(prompt_tokens), hidden_size)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Literal

import torch
import torch.distributed as dist

from megatron_paced.checkpointing import iteration_dir, latest_step
from megatron_paced.forward_backward import (
    SequenceBatch,
    final_hidden_states,
    forward_eval,
    micro_batch_size_for,
)
from megatron_paced.models.sharding import unwrap_model
from megatron_paced.paced.sharded_rows import row_block_tensor
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
    hidden_size = unwrap_model(model[-1]).config.hidden_size
    with final_hidden_states(model, ctx, detach=True) as captured:
        def pool_on_last_stage(output, micro_batch):
            hidden = captured.pop(0)  # (s, b, h), split along s under sequence parallelism
            if ctx.config.sequence_parallel:
                parts = [torch.empty_like(hidden) for _ in range(ctx.tp_size)]
                dist.all_gather(parts, hidden.contiguous(), group=ctx.tp_group)
                hidden = torch.cat(parts)
            pooled = pool_hidden(hidden.transpose(0, 1).float(), micro_batch.completion_mask,
                                 pooling)
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int,
                                                    device=output.device), {"features": pooled}

        logs = forward_eval(
            model, SequenceBatch(tokens, mask), pool_on_last_stage, ctx,
            micro_batch_size=micro_batch_size_for(len(prompts), micro_batch_size))
    if ctx.is_last_stage:
        features = torch.cat([log["features"] for log in logs]).float()
    else:
        features = torch.empty(len(prompts), hidden_size, dtype=torch.float32,
                               device=ctx.device)
    return broadcast_from_last_stage(features, ctx).cpu()


def project(features: torch.Tensor, dim: int, *, seed: int) -> torch.Tensor:
    """(n, H) -> (n, dim) by a fixed Gaussian matrix / sqrt(dim), seeded (the same on every
    rank); unchanged when ``dim`` is 0 or H."""
    hidden = features.shape[1]
    if dim in (0, hidden):
        return features
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(hidden, dim, generator=gen, dtype=torch.float64) / dim ** 0.5
    return (features.double() @ matrix).float()


def standardize(local: torch.Tensor, dp_group: dist.ProcessGroup | None,
                *others: torch.Tensor) -> list[torch.Tensor]:
    """Each column to mean 0 and std 1 over all prompts of all DP ranks (``local`` is this
    rank's block); ``others`` (e.g. held-out prompts) are shifted and scaled the same way."""
    stats = torch.cat([torch.tensor([float(len(local))], dtype=torch.float64),
                       local.double().sum(0), (local.double() ** 2).sum(0)])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(stats, group=dp_group)
    width = local.shape[1]
    count = stats[0].clamp(min=1)
    mean = stats[1:1 + width] / count
    std = (stats[1 + width:] / count - mean ** 2).clamp(min=0).sqrt().clamp(min=1e-6)
    return [((x.double() - mean) / std).float() for x in (local, *others)]


def feature_cache_dir(cache: str, identity: dict) -> str:
    """``<cache>/<sha256 of the identity>``: one folder per (base model, prompts, settings)."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return os.path.join(cache, key.hexdigest()[:24])


def prompts_digest(prompts) -> str:
    """A digest of token-id lists, for a cache key."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt).encode())
    return digest.hexdigest()


def sharded_prompts_digest(prompts_of_rows, row_start: int, row_end: int,
                           dp_group: dist.ProcessGroup | None) -> str:
    """A digest of all prompts with their row numbers, each DP rank reading only its block
    (collective over DP), the same on any DP size: four 32-bit lanes of each row's sha256,
    summed over rows (no overflow below 2**31 rows)."""
    lanes = torch.zeros(4, dtype=torch.int64)
    for row, prompt in enumerate(prompts_of_rows(row_start, row_end), start=row_start):
        digest = hashlib.sha256(json.dumps([row, prompt]).encode()).digest()
        lanes += torch.tensor([int.from_bytes(digest[i:i + 4], "little") for i in (0, 4, 8, 12)])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(lanes, group=dp_group)
    return "".join(f"{int(lane):016x}" for lane in lanes)


def dp_slice(num: int, ctx: ParallelContext) -> tuple[int, int]:
    """This DP rank's contiguous share ``[start, end)`` of ``num`` items."""
    return num * ctx.dp_rank // ctx.dp_size, num * (ctx.dp_rank + 1) // ctx.dp_size


def gather_dp_slices(local: torch.Tensor, num: int, ctx: ParallelContext) -> torch.Tensor:
    """(num, w): every DP rank's :func:`dp_slice` rows, in order (collective over DP)."""
    if ctx.dp_size == 1:
        return local
    longest = -(-num // ctx.dp_size)
    padded = local.new_zeros(longest, local.shape[1])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.dp_size)]
    dist.all_gather(parts, padded.to(ctx.device), group=ctx.dp_group)
    sizes = [num * (r + 1) // ctx.dp_size - num * r // ctx.dp_size for r in range(ctx.dp_size)]
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


def _cache_state(local: torch.Tensor, heldout: torch.Tensor, row_start: int, num_prompts: int,
                 replica_id) -> dict:
    return {"features": row_block_tensor("features", local, row_start=row_start,
                                         num_prompts=num_prompts, replica_id=replica_id),
            "heldout": heldout}


def log_z_features(model: list[torch.nn.Module], prompts_of_rows, heldout_prompts,
                   ctx: ParallelContext, *, row_start: int, row_end: int, num_prompts: int,
                   dim: int, pooling: Literal["mean", "last"], micro_batch_size: int, seed: int,
                   cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-Z head's inputs (collective over the model's groups): this DP rank's block of
    rows ``[row_start, row_end)`` and the held-out prompts, pooled, projected to ``dim`` and
    standardized over all prompts. ``prompts_of_rows(start, end)`` gives the rows' token ids.
    With ``cache_dir``, read from there when present, else computed and written there."""
    from megatron.core import dist_checkpointing

    hidden_size = unwrap_model(model[0]).config.hidden_size
    width = dim or hidden_size
    replica_id = (ctx.tp_rank, ctx.pp_rank)
    if cache_dir and os.path.isfile(os.path.join(cache_dir, "metadata.json")):
        template = _cache_state(torch.zeros(row_end - row_start, width), torch.zeros(0),
                                row_start, num_prompts, replica_id)
        loaded = dist_checkpointing.load(template, cache_dir)
        return loaded["features"].float(), loaded["heldout"].float()

    def features_of(prompts):
        if not prompts:
            return torch.zeros(0, hidden_size)
        return prompt_features(model, prompts, ctx, micro_batch_size=micro_batch_size,
                               pooling=pooling)

    local = project(features_of(prompts_of_rows(row_start, row_end)), width, seed=seed)
    start, end = dp_slice(len(heldout_prompts), ctx)  # each DP rank pools a share
    heldout = gather_dp_slices(project(features_of(heldout_prompts[start:end]), width,
                                       seed=seed), len(heldout_prompts), ctx)
    local, heldout = standardize(local, ctx.dp_group, heldout)
    if cache_dir:
        tmp = cache_dir + ".tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        dist_checkpointing.save(_cache_state(local, heldout, row_start, num_prompts,
                                             replica_id), tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            os.replace(tmp, cache_dir)
        dist.barrier()
    return local, heldout


def set_log_z_features(log_z, task, model, *, job, model_cfg, ctx, step: int) -> None:
    """Give a learned log Z (``log_z.features is None``) its prompt features from ``model``
    (the policy as RL starts), from ``--log-z-feature-cache`` when a cache of the same base
    model, prompts and settings exists (its identity: the loaded checkpoint or the warm
    start's settings, the model shape, the step, pooling, width, seed and the prompts'
    digests). A table, or a head whose checkpoint brought its features, is left as it is."""
    import dataclasses

    if not log_z.needs_features:  # a table, or features loaded with the checkpoint
        return
    cfg = job.log_z

    def prompts_of_rows(start: int, end: int) -> list[list[int]]:
        return [task.prompt_tokens(task.problems[row]) for row in range(start, end)]

    heldout = [task.prompt_tokens(problem) for problem in task.eval_problems]
    cache_dir = None
    if cfg.log_z_feature_cache:
        load = job.checkpoint.load
        step = latest_step(load) if load else None
        loaded = iteration_dir(load, step) if step is not None else None
        base = ({"load": os.path.realpath(loaded), "written": os.path.getmtime(loaded)}
                if loaded else
                {"seed": job.train.seed, "sft_warmup_iters": job.train.sft_warmup_iters,
                 "sft_lr": job.train.sft_lr})
        identity = {"model": dataclasses.asdict(model_cfg), "base": base,
                    "step": step, "pooling": cfg.log_z_feature_pooling,
                    "dim": log_z.feature_dim, "seed": job.train.seed,
                    "prompts": sharded_prompts_digest(prompts_of_rows, log_z.row_start,
                                                      log_z.row_end, ctx.dp_group),
                    "heldout": prompts_digest(heldout)}
        cache_dir = feature_cache_dir(cfg.log_z_feature_cache, identity)
    local, heldout_features = log_z_features(
        model, prompts_of_rows, heldout, ctx, row_start=log_z.row_start,
        row_end=log_z.row_end, num_prompts=log_z.num_prompts, dim=log_z.feature_dim,
        pooling=cfg.log_z_feature_pooling, micro_batch_size=job.batch.micro_batch_size,
        seed=job.train.seed, cache_dir=cache_dir)
    log_z.set_features(local, heldout_features)
