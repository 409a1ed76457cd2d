"""Map between a rank's TP/PP shard of a Megatron ``GPTModel`` and the full (TP1, PP1) tensors.

Every parameter has a *global name*: its name in the unsplit model, with the layer index
counted over the whole stack (``decoder.layers.7.mlp.linear_fc1.weight`` on the second of
two 4-layer stages is ``decoder.layers.3...`` locally), and the tied output weight of the last
stage named as the embedding it copies. A *full tensor* is the TP1 parameter. The contract:

    shard_of(full, param_meta, tp_rank, tp_size)  ->  this rank's shard
    full_of([shard_0, ..., shard_{tp-1}], param_meta) -> full   (its inverse)

with ``param_meta`` read off the parameter (Megatron sets ``tensor_model_parallel`` and
``partition_dim`` on split weights). Most split weights are plain chunks along
``partition_dim``; the SwiGLU ``linear_fc1`` is the one exception: its TP1 rows are
``[gate; up]`` and each rank holds ``[gate_r; up_r]``. The fused QKV of Megatron is laid out
group-major (``[q_g.., k_g, v_g]`` per KV group), so chunks along dim 0 are whole groups and
need no transform.

This is what layout-invariant initialization, invariance tests, checkpoint conversion and
weight sync share.

Usage::

    full = gather_full_state_dict(model, tp_group, pp_group)   # {global name: tensor}
    init_layout_invariant_(model, seed=1234, init_std=0.02, num_layers=24, tp_group=tp_group)
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ShardMeta:
    """How a parameter is split over tensor-parallel ranks."""

    partition_dim: int | None  # None: replicated on every TP rank
    gated: bool = False  # SwiGLU fc1: rows are [gate; up], split per half


def shard_meta(name: str, param: torch.Tensor) -> ShardMeta:
    """Read the TP split of a parameter from the attributes Megatron sets on it."""
    if not getattr(param, "tensor_model_parallel", False):
        return ShardMeta(partition_dim=None)
    dim = int(getattr(param, "partition_dim", 0))
    return ShardMeta(partition_dim=dim, gated=name.endswith("mlp.linear_fc1.weight")
                     or name.endswith("mlp.linear_fc1.bias"))


def shard_of(full: torch.Tensor, meta: ShardMeta, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of a full (TP1) tensor."""
    if meta.partition_dim is None or tp_size == 1:
        return full
    if meta.gated:
        gate, up = full.chunk(2, dim=meta.partition_dim)
        return torch.cat(
            [gate.chunk(tp_size, dim=meta.partition_dim)[tp_rank],
             up.chunk(tp_size, dim=meta.partition_dim)[tp_rank]],
            dim=meta.partition_dim,
        )
    return full.chunk(tp_size, dim=meta.partition_dim)[tp_rank]


def full_of(shards: list[torch.Tensor], meta: ShardMeta) -> torch.Tensor:
    """The full (TP1) tensor from all TP ranks' shards, in rank order."""
    if meta.partition_dim is None or len(shards) == 1:
        return shards[0]
    if meta.gated:
        halves = [s.chunk(2, dim=meta.partition_dim) for s in shards]
        gate = torch.cat([h[0] for h in halves], dim=meta.partition_dim)
        up = torch.cat([h[1] for h in halves], dim=meta.partition_dim)
        return torch.cat([gate, up], dim=meta.partition_dim)
    return torch.cat(shards, dim=meta.partition_dim)


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> global name (whole-stack layer index; tied weight renamed)."""
    inner = unwrap_model(model)
    offsets: dict[int, int] = {}
    decoder = getattr(inner, "decoder", None)
    if decoder is not None:
        for local_index, layer in enumerate(decoder.layers):
            offsets[local_index] = layer.layer_number - 1 - local_index
    names = {}
    for name, param in inner.named_parameters():
        global_name = name
        match = _LAYER_RE.search(name)
        if match:
            local_index = int(match.group(1))
            global_index = local_index + offsets.get(local_index, 0)
            global_name = (name[: match.start(1)] + str(global_index) + name[match.end(1):])
        if getattr(param, "shared_embedding", False) and name.startswith("output_layer."):
            # The last stage's copy of a tied embedding (PP > 1).
            global_name = "embedding.word_embeddings.weight"
        names[name] = global_name
    return names


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside wrappers such as Megatron's DDP (``.module`` chains)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def gather_full_state_dict(
    model: torch.nn.Module, tp_group: dist.ProcessGroup, pp_group: dist.ProcessGroup
) -> dict[str, torch.Tensor]:
    """All full (TP1, PP1) parameters by global name, on every rank of ``tp_group x pp_group``.

    Meant for tests and small models: it materializes the whole model on every rank.
    """
    # On the host: pickled CUDA tensors would be rebuilt on the sender's device.
    local_full = {name: tensor.clone().cpu() for name, tensor in iter_full_params(model,
                                                                                  tp_group)}
    stages: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, local_full, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage or {})
    return merged


_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _seed_for(seed: int, global_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std_for(global_name: str, init_std: float, num_layers: int) -> float | None:
    """Megatron's init rule by name: None for norms and biases (ones/zeros), scaled std for
    the output projections of attention and MLP, ``init_std`` for the other weights."""
    # Local spec: "...input_layernorm.weight"; Transformer Engine's fused norm+linear:
    # "...linear_qkv.layer_norm_weight".
    if any("norm" in part for part in global_name.split(".")[-2:]) or global_name.endswith(
            "bias"):
        return None
    if global_name.endswith("linear_proj.weight") or global_name.endswith("linear_fc2.weight"):
        return init_std / math.sqrt(2.0 * num_layers)
    return init_std


@torch.no_grad()
def init_layout_invariant_(
    model: torch.nn.Module, *, seed: int, init_std: float, num_layers: int, vocab_size: int,
    tp_rank: int, tp_size: int,
) -> None:
    """Initialize every parameter from ``(seed, global name)`` alone, then keep this rank's shard.

    Megatron's own initialization draws from one RNG stream in build order, so a PP2 model
    gets different weights than a PP1 model with the same seed. Here each full tensor comes
    from its own generator, so every TP/PP/DP layout starts from the same weights. The rows of
    the vocabulary padding (whose size depends on TP) are zero. Each full tensor is
    materialized once, one at a time.
    """
    names = global_param_names(model)
    for name, param in unwrap_model(model).named_parameters():
        global_name = names[name]
        meta = shard_meta(name, param)
        full_shape = list(param.shape)
        if meta.partition_dim is not None:
            full_shape[meta.partition_dim] *= tp_size
        std = init_std_for(global_name, init_std, num_layers)
        if std is None:
            value = 0.0 if global_name.endswith("bias") else 1.0
            param.fill_(value)
            continue
        generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, global_name))
        padded_rows = 0
        if global_name in _VOCAB_PARAMS:
            padded_rows = full_shape[0] - vocab_size
            full_shape[0] = vocab_size
        full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if padded_rows:
            full = torch.cat([full, full.new_zeros(padded_rows, *full_shape[1:])])
        param.copy_(shard_of(full, meta, tp_rank, tp_size).to(param.dtype))


def iter_full_params(model: torch.nn.Module, tp_group: dist.ProcessGroup | None):
    """(global name, full tensor) of this pipeline stage's parameters, one at a time, so that
    at most one full parameter is materialized (collective over the TP group)."""
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    names = global_param_names(model)
    for name, param in unwrap_model(model).named_parameters():
        data = param.detach()
        meta = shard_meta(name, param)
        if meta.partition_dim is not None and tp_size > 1:
            shards = [torch.empty_like(data) for _ in range(tp_size)]
            dist.all_gather(shards, data.contiguous(), group=tp_group)
            data = full_of(shards, meta)
        yield names[name], data


@torch.no_grad()
def load_full_params_(model: torch.nn.Module, full: dict[str, torch.Tensor], *, tp_rank: int,
                      tp_size: int, strict: bool = True) -> list[str]:
    """Copy full (TP1) tensors, by global name, into this rank's shards, as one transaction:
    every name, shape and value is checked first (a name the stage does not hold, a shape
    that does not fit, a non-finite value, and with ``strict`` a parameter left out, raise
    naming it) and only then is anything copied, so on an error the model is as before.
    Returns the names that were loaded."""
    names = global_param_names(model)
    params = {names[name]: (name, param) for name, param in unwrap_model(model).named_parameters()}
    unknown = sorted(set(full) - set(params))
    if unknown:
        raise KeyError(f"no parameter named {unknown[:4]} in this model"
                       + (f" (and {len(unknown) - 4} more)" if len(unknown) > 4 else ""))
    if strict:
        missing = [name for name in params if name not in full]
        if missing:
            raise KeyError(f"no value for parameter {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    shards = {}
    for global_name, (name, param) in params.items():
        if global_name not in full:
            continue
        value = full[global_name]
        if not (value.is_floating_point() and param.is_floating_point()):
            raise TypeError(f"{global_name}: dtype {value.dtype} cannot load into "
                            f"{param.dtype}")
        if value.dim() != param.dim():
            raise ValueError(f"{global_name}: a {value.dim()}-d tensor does not fit parameter "
                             f"{tuple(param.shape)}")
        shard = shard_of(value, shard_meta(name, param), tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{global_name}: shard {tuple(shard.shape)} does not fit parameter "
                             f"{tuple(param.shape)}")
        shard = shard.to(param.dtype)
        if not bool(torch.isfinite(shard).all()):
            raise ValueError(f"{global_name}: holds non-finite values (NaN or inf)")
        shards[global_name] = (param, shard)
    for param, shard in shards.values():
        param.copy_(shard)
    return list(shards)
