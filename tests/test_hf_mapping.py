"""Megatron <-> HF name table and transforms: bitwise round trips, QKV layout, bad names."""

from __future__ import annotations

import pytest
import torch

from megatron_paced.models.config import PRESETS
from megatron_paced.models.hf_mapping import (
    hf_to_megatron, megatron_to_hf, merge_qkv, split_qkv,
)


def fake_megatron_state(cfg, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Random full tensors with Megatron's names and shapes for one config."""
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hd
    state = {"embedding.word_embeddings.weight": torch.randn(padded_vocab, h),
             "decoder.final_layernorm.weight": torch.randn(h)}
    state["embedding.word_embeddings.weight"][cfg.vocab_size:] = 0
    if cfg.untie_embeddings_and_output_weights:
        state["output_layer.weight"] = torch.randn(padded_vocab, h)
        state["output_layer.weight"][cfg.vocab_size:] = 0
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        state |= {p + "input_layernorm.weight": torch.randn(h),
                  p + "self_attention.linear_qkv.weight": torch.randn(qkv_rows, h),
                  p + "self_attention.linear_proj.weight": torch.randn(h, cfg.num_attention_heads * hd),
                  p + "pre_mlp_layernorm.weight": torch.randn(h),
                  p + "mlp.linear_fc1.weight": torch.randn(2 * f, h),
                  p + "mlp.linear_fc2.weight": torch.randn(h, f)}
        if cfg.spec.add_qkv_bias:
            state[p + "self_attention.linear_qkv.bias"] = torch.randn(qkv_rows)
        if cfg.spec.qk_layernorm:
            state[p + "self_attention.q_layernorm.weight"] = torch.randn(hd)
            state[p + "self_attention.k_layernorm.weight"] = torch.randn(hd)
    return state


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "smollm2-135m"])
def test_round_trip_is_bitwise(preset):
    cfg = PRESETS[preset]
    padded = cfg.padded_vocab_size(2)
    state = fake_megatron_state(cfg, padded)
    hf = megatron_to_hf(state, cfg)
    assert hf["model.embed_tokens.weight"].shape[0] == cfg.vocab_size
    assert ("lm_head.weight" in hf) == cfg.untie_embeddings_and_output_weights
    assert ("model.layers.0.self_attn.q_proj.bias" in hf) == (preset == "tiny-qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in hf) == (preset == "tiny-qwen3")
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (
        cfg.num_query_groups * cfg.head_dim, cfg.hidden_size)
    back = hf_to_megatron(hf, cfg, padded_vocab_size=padded)
    assert sorted(back) == sorted(state)
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_qkv_is_group_major():
    cfg = PRESETS["tiny-llama"].replace(num_attention_heads=4, num_query_groups=2,
                                        hidden_size=8, kv_channels=1)
    # Rows per group: q0 q1 k v; label each row with its HF destination.
    fused = torch.tensor([10.0, 11, 20, 30, 12, 13, 21, 31]).unsqueeze(-1)
    q, k, v = split_qkv(fused, cfg)
    assert q.flatten().tolist() == [10, 11, 12, 13] and k.flatten().tolist() == [20, 21]
    assert v.flatten().tolist() == [30, 31] and torch.equal(merge_qkv(q, k, v, cfg), fused)


def test_bad_names():
    cfg = PRESETS["tiny-llama"]
    with pytest.raises(KeyError, match="decoder.layers.0.mystery.weight"):
        megatron_to_hf({"decoder.layers.0.mystery.weight": torch.zeros(1)}, cfg)
    hf = megatron_to_hf(fake_megatron_state(cfg, 512), cfg)
    del hf["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.self_attn.v_proj.weight"):
        hf_to_megatron(hf, cfg, padded_vocab_size=512)
    with pytest.raises(KeyError, match="unexpected Hugging Face tensor 'model.rotary.inv_freq'"):
        hf_to_megatron({"model.rotary.inv_freq": torch.zeros(1)}, cfg, padded_vocab_size=512)


def test_te_and_local_spec_parameter_names_agree():
    """Megatron-Core's TE spec fuses the norms into the next linear
    (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``,
    gpt_layer_specs.py); the local spec names them ``input_layernorm`` and
    ``pre_mlp_layernorm`` and maps them to TE's names in its sharded_state_dict_keys_map, so
    checkpoints agree; parameter dicts compared across hosts go through these names."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_paced.models.gpt import TE_TO_LOCAL_NAMES, canonical_param_name

    local = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    keys_map = local.submodules.sharded_state_dict_keys_map
    assert {f".{v}": f".{k}" for k, v in keys_map.items()} == TE_TO_LOCAL_NAMES
    fused = "module.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_param_name(fused) == "module.decoder.layers.3.input_layernorm.weight"
    assert canonical_param_name("decoder.layers.0.mlp.linear_fc1.layer_norm_bias") == \
        "decoder.layers.0.pre_mlp_layernorm.bias"
    assert canonical_param_name("decoder.layers.0.mlp.linear_fc1.weight") == \
        "decoder.layers.0.mlp.linear_fc1.weight"


def test_a_transformer_engine_that_does_not_import_is_said(monkeypatch):
    """A TE install that fails to import (a build for another torch or CUDA) falls back to
    the local spec with a warning, not silently."""
    import sys
    import types

    import torch

    from megatron_paced.models import gpt

    broken = types.ModuleType("transformer_engine")
    broken.__path__ = []  # a package whose submodule import fails

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "transformer_engine.pytorch":
                raise OSError("libtransformer_engine.so: undefined symbol")
            return None

    monkeypatch.setitem(sys.modules, "transformer_engine", broken)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpt.transformer_engine_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Transformer Engine is installed but does not "
                                             "import.*undefined symbol"):
            assert gpt.transformer_engine_available() is False
    finally:
        gpt.transformer_engine_available.cache_clear()
