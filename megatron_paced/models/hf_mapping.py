"""Megatron <-> Hugging Face parameter names and tensor layouts, one table for Llama/Qwen2/Qwen3.

Both sides are *full* (TP1, PP1) tensors keyed by global names (see
:mod:`megatron_paced.models.sharding` for shards). The table is declarative: a Megatron name
pattern, the HF name(s) it becomes, and a named transform. ``{i}`` is the layer index.

    Megatron                                           HF                                   transform
    embedding.word_embeddings.weight                   model.embed_tokens.weight            vocab rows
    decoder.layers.{i}.input_layernorm.weight          model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight  ...self_attn.{q,k,v}_proj.weight    split_qkv
    decoder.layers.{i}.self_attention.linear_qkv.bias    ...self_attn.{q,k,v}_proj.bias      split_qkv (Qwen2)
    decoder.layers.{i}.self_attention.q_layernorm.weight ...self_attn.q_norm.weight          (Qwen3)
    decoder.layers.{i}.self_attention.k_layernorm.weight ...self_attn.k_norm.weight          (Qwen3)
    decoder.layers.{i}.self_attention.linear_proj.weight ...self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight        ...post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight           ...mlp.{gate,up}_proj.weight         split_gate_up
    decoder.layers.{i}.mlp.linear_fc2.weight           ...mlp.down_proj.weight
    decoder.final_layernorm.weight                     model.norm.weight
    output_layer.weight                                lm_head.weight                       vocab rows (untied only)

Transforms: Megatron's fused QKV is group-major -- for each of the ``num_query_groups`` KV
heads, its ``heads_per_group`` query heads, then its key, then its value (``head_dim`` rows
each) -- while HF keeps separate q/k/v projections; ``linear_fc1`` is ``[gate; up]``; vocab
rows beyond the true vocabulary are Megatron's padding (dropped towards HF, zero-filled
back). With the Transformer Engine spec the two layer norms live inside the next linear
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); both spellings map.

Usage::

    hf = megatron_to_hf(full_megatron_state, model_cfg)          # {HF name: tensor}
    back = hf_to_megatron(hf, model_cfg, padded_vocab_size=512)  # bitwise equal to the input
"""

from __future__ import annotations

import re

import torch

from megatron_paced.models.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer: Megatron suffix -> HF suffix (plain copies).
_LAYER_COPIES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}
_FC1 = "mlp.linear_fc1.weight"
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# HF name -> Megatron name of the tensors outside the layers.
HF_GLOBAL_TO_MEGATRON = {hf: megatron for megatron, hf in _GLOBAL.items()}
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
# Fused Megatron parameter -> the HF parts it is made of, in order.
_FUSED_FROM = {
    "self_attention.linear_qkv.weight": [f"self_attn.{p}_proj.weight" for p in "qkv"],
    "self_attention.linear_qkv.bias": [f"self_attn.{p}_proj.bias" for p in "qkv"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
}
_SPLIT_PARTS = {part: fused for fused, parts in _FUSED_FROM.items() for part in parts}


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Megatron group-major fused QKV rows -> (q, k, v) rows in HF order."""
    groups, per_group, head_dim = (cfg.num_query_groups,
                                   cfg.num_attention_heads // cfg.num_query_groups, cfg.head_dim)
    grouped = fused.reshape(groups, per_group + 2, head_dim, *fused.shape[1:])
    q = grouped[:, :per_group].reshape(groups * per_group * head_dim, *fused.shape[1:])
    k = grouped[:, per_group].reshape(groups * head_dim, *fused.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *fused.shape[1:])
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(q, k, v) HF rows -> Megatron group-major fused rows (inverse of :func:`split_qkv`)."""
    groups, per_group, head_dim = (cfg.num_query_groups,
                                   cfg.num_attention_heads // cfg.num_query_groups, cfg.head_dim)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group, head_dim, *rest),
                         k.reshape(groups, 1, head_dim, *rest),
                         v.reshape(groups, 1, head_dim, *rest)], dim=1)
    return grouped.reshape(groups * (per_group + 2) * head_dim, *rest)


def megatron_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full Megatron tensors (global names) -> HF tensors. Unknown names raise KeyError."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        out.update(_one_to_hf(name, tensor, cfg))
    if not cfg.untie_embeddings_and_output_weights:
        out.pop("lm_head.weight", None)
    return out


def _one_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if name in _GLOBAL:
        if name in _VOCAB:
            tensor = tensor[: cfg.vocab_size]
        return {_GLOBAL[name]: tensor}
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face name for Megatron parameter {name!r}")
    index, suffix = match.groups()
    prefix = f"model.layers.{index}."
    if suffix in _LAYER_COPIES:
        return {prefix + _LAYER_COPIES[suffix]: tensor}
    if suffix in _QKV:
        q, k, v = split_qkv(tensor, cfg)
        kind = _QKV[suffix]
        return {f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                f"{prefix}self_attn.v_proj.{kind}": v}
    if suffix == _FC1:
        gate, up = tensor.chunk(2, dim=0)
        return {f"{prefix}mlp.gate_proj.weight": gate, f"{prefix}mlp.up_proj.weight": up}
    raise KeyError(f"no Hugging Face name for Megatron parameter {name!r}")


def hf_to_megatron(hf: dict[str, torch.Tensor], cfg: ModelConfig, *, padded_vocab_size: int,
                   te_layernorm_names: bool = False, complete: bool = True
                   ) -> dict[str, torch.Tensor]:
    """HF tensors -> full Megatron tensors (local-spec names unless ``te_layernorm_names``).
    Unexpected HF names, and parts missing from a fused parameter, raise KeyError naming
    them; ``complete=False`` accepts a subset of the model (a weight-sync bucket)."""
    layer_copies = {v: k for k, v in _LAYER_COPIES.items()
                    if ("layer_norm_weight" in k) == te_layernorm_names or "layernorm" not in v}
    out: dict[str, torch.Tensor] = {}
    # Split HF tensors, collected per (layer, fused Megatron parameter) before merging.
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if name in HF_GLOBAL_TO_MEGATRON:
            target = HF_GLOBAL_TO_MEGATRON[name]
            if target in _VOCAB:
                pad = padded_vocab_size - tensor.shape[0]
                tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])])
            out[target] = tensor
            continue
        match = _HF_LAYER.match(name)
        if not match:
            raise KeyError(f"unexpected Hugging Face tensor {name!r}")
        index, suffix = match.groups()
        if suffix in layer_copies:
            out[f"decoder.layers.{index}.{layer_copies[suffix]}"] = tensor
        elif suffix in _SPLIT_PARTS:
            pending.setdefault((index, _SPLIT_PARTS[suffix]), {})[suffix] = tensor
        else:
            raise KeyError(f"unexpected Hugging Face tensor {name!r}")
    for (index, fused), parts in pending.items():
        names = _FUSED_FROM[fused]
        missing = [f"model.layers.{index}.{n}" for n in names if n not in parts]
        if missing:
            raise KeyError(f"missing Hugging Face tensors {missing}")
        tensors = [parts[n] for n in names]
        out[f"decoder.layers.{index}.{fused}"] = (
            merge_qkv(*tensors, cfg) if "qkv" in fused else torch.cat(tensors))
    if complete and cfg.untie_embeddings_and_output_weights and "output_layer.weight" not in out:
        raise KeyError("missing Hugging Face tensor 'lm_head.weight' (untied embeddings)")
    return out


def hf_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this shape holds, with its shape, in model
    order (what a converter expects to find, and what it writes)."""
    h, q_rows, kv_rows = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_query_groups * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q_rows, h),
                 "self_attn.k_proj.weight": (kv_rows, h), "self_attn.v_proj.weight": (kv_rows, h)}
        if cfg.spec.add_qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
                          "self_attn.v_proj.bias": (kv_rows,)})
        if cfg.spec.qk_layernorm:
            layer.update({"self_attn.q_norm.weight": (cfg.head_dim,),
                          "self_attn.k_norm.weight": (cfg.head_dim,)})
        layer.update({"self_attn.o_proj.weight": (h, q_rows),
                      "post_attention_layernorm.weight": (h,),
                      "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h),
                      "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
                      "mlp.down_proj.weight": (h, cfg.ffn_hidden_size)})
        shapes.update({prefix + name: shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def hf_layer_of(name: str) -> int | None:
    """The layer index of an HF tensor name (None for embeddings, final norm and head)."""
    match = _HF_LAYER.match(name)
    return int(match.group(1)) if match else None
