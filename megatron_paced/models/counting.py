"""Model sizes from a shape: parameters as published, and per GPU of a TP x PP layout as
Megatron holds them (vocabulary padded to 128 x TP; with tied embeddings and PP > 1 the last
stage keeps its own copy of the embedding as the output layer); and the shape of a known name
or a Hugging Face ``config.json`` for the tools' ``--model``.

Usage::

    model = resolve_model("qwen2.5-7b")          # or "ckpt/Qwen2.5-7B/config.json"
    count_parameters(model)                      # 7_615_616_512
    count_rank_parameters(model, tp=2, pp=2, pp_rank=0)
"""

from __future__ import annotations

import json
import os

from megatron_paced.config import ConfigError
from megatron_paced.models.config import PRESETS, ModelConfig

KNOWN_MODELS: dict[str, ModelConfig] = PRESETS  # names --model accepts


def resolve_model(name_or_path: str) -> ModelConfig:
    """A known name (``qwen2.5-7b``), a ``config.json`` or a folder holding one."""
    if name_or_path in KNOWN_MODELS:
        model = KNOWN_MODELS[name_or_path]
    elif os.path.exists(name_or_path) or name_or_path.endswith(".json") or os.sep in name_or_path:
        model = _read_hf_config(name_or_path)
    else:
        raise ConfigError(
            f"--model {name_or_path!r}: unknown model name; known: "
            f"{', '.join(sorted(KNOWN_MODELS))}; or pass a config.json or its folder")
    try:
        model.validate()
    except ConfigError as err:
        raise ConfigError(f"--model {name_or_path}: {err}") from None
    except TypeError as err:  # e.g. "hidden_size": "4096" in a config.json
        raise ConfigError(f"--model {name_or_path}: a field has the wrong type ({err})") from None
    return model


def _read_hf_config(path: str) -> ModelConfig:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"--model {path}: no config.json at {file}")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--model {file}: not a readable JSON file ({err})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"--model {file}: expected a JSON object")
    try:
        return ModelConfig.from_hf_config(hf)
    except ConfigError as err:
        raise ConfigError(f"--model {file}: {str(err).replace('--hf-config config: ', '')}"
                                ) from None
    except KeyError as err:
        raise ConfigError(f"--model {file}: config.json has no field {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--model {file}: unsupported config.json ({err})") from None


def _layer_params(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (norms replicated)."""
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    qkv_out = (model.num_attention_heads + 2 * model.num_query_groups) * d // tp
    attention = h * qkv_out + (model.num_attention_heads * d // tp) * h
    if model.spec.add_qkv_bias:
        attention += qkv_out
    if model.spec.qk_layernorm:
        attention += 2 * d
    mlp = h * (2 * f // tp) + (f // tp) * h
    return attention + mlp + 2 * h


def count_parameters(model: ModelConfig) -> int:
    """Parameters of the model as published (unpadded vocabulary, tied embeddings once)."""
    embeddings = model.vocab_size * model.hidden_size
    num_embedding_matrices = 2 if model.untie_embeddings_and_output_weights else 1
    return (model.num_layers * _layer_params(model, 1) + model.hidden_size
            + num_embedding_matrices * embeddings)


def count_rank_parameters(model: ModelConfig, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters one GPU holds in Megatron: its TP shard of pipeline stage ``pp_rank``.

    The vocabulary is padded to a multiple of 128 x TP. With tied embeddings and PP > 1 the
    last stage holds its own copy of the embedding as the output layer (Megatron keeps the two
    in sync with an all-reduce); with PP 1 the output layer reuses the embedding.
    """
    first, last = pp_rank == 0, pp_rank == pp - 1
    vocab_shard = model.padded_vocab_size(tp) // tp * model.hidden_size
    count = model.num_layers // pp * _layer_params(model, tp)
    if first:
        count += vocab_shard
    if last:
        count += model.hidden_size  # final norm
        if model.untie_embeddings_and_output_weights or not first:
            count += vocab_shard
    return count
