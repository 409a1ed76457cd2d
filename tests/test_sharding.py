"""TP shard <-> full tensor maps and the init rule (pure tensor code, no process group)."""

from __future__ import annotations

import pytest
import torch

from megatron_paced.models.sharding import ShardMeta, full_of, init_std_for, shard_of


@pytest.mark.parametrize("meta", [ShardMeta(0), ShardMeta(1), ShardMeta(0, gated=True),
                                  ShardMeta(None)])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_shard_then_gather_is_identity(meta, tp_size):
    full = torch.randn(16, 8)
    shards = [shard_of(full, meta, rank, tp_size) for rank in range(tp_size)]
    assert torch.equal(full_of(shards, meta), full)
    if meta.partition_dim is not None and tp_size > 1:
        assert shards[0].shape[meta.partition_dim] == full.shape[meta.partition_dim] // tp_size


def test_gated_fc1_keeps_gate_and_up_halves_on_each_rank():
    gate, up = torch.arange(8.0).reshape(8, 1), 100 + torch.arange(8.0).reshape(8, 1)
    full = torch.cat([gate, up])  # TP1 layout [gate; up]
    rank1 = shard_of(full, ShardMeta(0, gated=True), 1, 2)
    assert rank1.flatten().tolist() == [4, 5, 6, 7, 104, 105, 106, 107]


def test_init_rule_by_name():
    assert init_std_for("decoder.layers.0.input_layernorm.weight", 0.02, 4) is None
    assert init_std_for("decoder.layers.0.self_attention.q_layernorm.weight", 0.02, 4) is None
    assert init_std_for("decoder.layers.0.self_attention.linear_qkv.bias", 0.02, 4) is None
    assert init_std_for("decoder.layers.1.mlp.linear_fc2.weight", 0.02, 8) == pytest.approx(0.005)
    assert init_std_for("decoder.layers.1.self_attention.linear_proj.weight", 0.02, 8) == \
        pytest.approx(0.005)
    assert init_std_for("embedding.word_embeddings.weight", 0.02, 8) == 0.02
    # Transformer Engine's spec fuses the norms into the next linear layer: still ones.
    for fused in ("self_attention.linear_qkv.layer_norm_weight",
                  "mlp.linear_fc1.layer_norm_weight"):
        assert init_std_for(f"decoder.layers.0.{fused}", 0.02, 4) is None
    assert init_std_for("decoder.layers.0.self_attention.linear_qkv.weight", 0.02, 4) == 0.02
    assert init_std_for("decoder.layers.0.mlp.linear_fc1.weight", 0.02, 4) == 0.02
