"""Tiny Hugging Face checkpoints built offline with ``transformers``: random Llama, Qwen2 and
Qwen3 models with every feature the converters map (GQA, QKV bias, QK-norm, an explicit head
dim, tied and untied embeddings, a vocabulary that is not a multiple of 128), saved as
several safetensors shards with an index.

Usage::

    folder = make_tiny_hf_checkpoint(tmp / "qwen3", "qwen3", dtype=torch.bfloat16)
"""

from __future__ import annotations

import os

import torch

FAMILIES = {
    # family: (config class, model-specific config)
    "llama": ("LlamaConfig", {"tie_word_embeddings": False, "rope_theta": 50000.0}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": False, "head_dim": 32}),
}


def make_tiny_hf_checkpoint(folder: str | os.PathLike, family: str, *,
                            dtype: torch.dtype = torch.float32, seed: int = 0,
                            vocab_size: int = 300, num_layers: int = 4) -> str:
    """A random ``family`` model saved to ``folder`` (sharded safetensors + config.json)."""
    import transformers

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(
        hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        max_position_embeddings=128, rms_norm_eps=1e-6, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights of every kind visibly different from their init
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.1)
    model.to(dtype).save_pretrained(folder, max_shard_size="60KB")
    return os.fspath(folder)


def read_hf_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (index or single file)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out
