"""Model configurations for the decoder-only architectures we train: Llama, Qwen2, Qwen3.

All three are the same Megatron ``GPTModel`` (RMSNorm, SwiGLU, RoPE, GQA) and differ only in
a few switches, kept in one declarative table keyed by the Hugging Face ``architectures``
entry of a ``config.json`` (never by substrings of a model name):

    =====================  ============  ========  ============================
    HF architecture        family        QKV bias  QK-norm (RMSNorm, per head)
    =====================  ============  ========  ============================
    LlamaForCausalLM       llama         no        no
    Qwen2ForCausalLM       qwen2         yes       no
    Qwen3ForCausalLM       qwen3         no        yes
    =====================  ============  ========  ============================

A :class:`ModelConfig` comes from flags (``--architecture llama --num-layers 2 ...``), from a
named preset (``--model tiny-llama``) or from a Hugging Face ``config.json``
(``--hf-config path/to/config.json`` or its folder). ``validate(parallel)`` checks it against
the parallel layout and raises :class:`~megatron_paced.config.ConfigError` naming the flag.

Usage::

    cfg = ModelConfig.from_hf_config("checkpoints/Qwen2.5-0.5B")
    cfg.validate(ParallelConfig(tensor_model_parallel_size=2))
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from megatron_paced.config import ConfigError, ParallelConfig, require


@dataclass(frozen=True)
class ArchitectureSpec:
    """What distinguishes one supported family from another."""

    family: str
    add_qkv_bias: bool
    qk_layernorm: bool


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": ArchitectureSpec("llama", add_qkv_bias=False, qk_layernorm=False),
    "Qwen2ForCausalLM": ArchitectureSpec("qwen2", add_qkv_bias=True, qk_layernorm=False),
    "Qwen3ForCausalLM": ArchitectureSpec("qwen3", add_qkv_bias=False, qk_layernorm=True),
}
FAMILIES: dict[str, str] = {spec.family: hf for hf, spec in ARCHITECTURES.items()}


@dataclass
class ModelConfig:
    """Shape and switches of a Llama/Qwen2/Qwen3-style decoder."""

    architecture: str = "llama"
    """Model family: llama, qwen2 or qwen3 (sets QKV bias and QK-norm)."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    ffn_hidden_size: int = 128
    """Width of the SwiGLU MLP (each of the gate and up projections)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int = 2
    """Number of key/value heads (GQA); equal to the query heads for plain multi-head."""
    kv_channels: Optional[int] = None
    """Width of one attention head; default hidden-size / num-attention-heads (Qwen3 sets it)."""
    vocab_size: int = 512
    """Size of the tokenizer's vocabulary (padded inside Megatron, never exposed)."""
    max_position_embeddings: int = 2048
    """Longest sequence the RoPE tables are built for."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1-style RoPE frequency scaling factor (None: no scaling)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    untie_embeddings_and_output_weights: bool = True
    """Separate output projection (False ties it to the input embedding)."""
    init_method_std: float = 0.02
    """Std of the normal initialization of random weights."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the TP size (Megatron's rule)."""

    @property
    def spec(self) -> ArchitectureSpec:
        return ARCHITECTURES[FAMILIES[self.architecture]]

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, parallel: ParallelConfig | None = None) -> None:
        require(self.architecture in FAMILIES, "architecture", self.architecture,
                f"unknown architecture; supported: {', '.join(sorted(FAMILIES))}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
                self.num_query_groups,
                f"must divide --num-attention-heads {self.num_attention_heads}")
        if self.kv_channels is None:
            require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                    self.hidden_size,
                    f"must be divisible by --num-attention-heads {self.num_attention_heads} "
                    "(or set --kv-channels)")
        if parallel is None:
            return
        tp = parallel.tensor_model_parallel_size
        pp = parallel.pipeline_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            if value % tp != 0:
                raise ConfigError(
                    f"--tensor-model-parallel-size {tp} does not divide "
                    f"{'--' + name.replace('_', '-')} {value}"
                )
        if self.num_layers % pp != 0:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} does not divide --num-layers "
                f"{self.num_layers}"
            )

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` (a path, its folder, or the parsed dict)."""
        source = "config"
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            if not os.path.isfile(path):
                raise ConfigError(f"--hf-config {path!r}: no such file")
            with open(path) as f:
                hf = json.load(f)
        archs = hf.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise ConfigError(
                f"--hf-config {source}: architectures {archs} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        spec = ARCHITECTURES[known[0]]
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * num_heads == hf["hidden_size"]:
            head_dim = None
        rope_factor = None
        # transformers >= 5 writes rope_theta and the scaling inside "rope_parameters".
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default")
                                             not in ("default", None) else None)
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
            if rope_type != "llama3" or any(
                float(scaling.get(k, v)) != float(v) for k, v in expected.items()
            ):
                raise ConfigError(
                    f"--hf-config {source}: rope_scaling {scaling} is not supported "
                    "(only Llama-3.1-style 'llama3' scaling with factors 1/4 and 8192)"
                )
            rope_factor = float(scaling["factor"])
        cfg = cls(
            architecture=spec.family,
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=num_heads,
            num_query_groups=hf.get("num_key_value_heads") or num_heads,
            kv_channels=head_dim,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rotary_base=float(rope_theta),
            rope_scaling_factor=rope_factor,
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            init_method_std=float(hf.get("initializer_range", 0.02)),
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"--hf-config {source}: hidden_act {hf['hidden_act']!r} is not "
                              "supported (SwiGLU with silu only)")
        if spec.family == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError(f"--hf-config {source}: use_sliding_window is not supported")
        return cfg

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict for this shape (the inverse of from_hf_config)."""
        hf: dict[str, Any] = {
            "architectures": [FAMILIES[self.architecture]],
            "model_type": self.architecture,
            "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rotary_base, "rms_norm_eps": self.norm_epsilon,
            "tie_word_embeddings": not self.untie_embeddings_and_output_weights,
            "initializer_range": self.init_method_std, "hidden_act": "silu",
            "attention_bias": self.spec.add_qkv_bias, "torch_dtype": dtype,
        }
        if self.rope_scaling_factor is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", "factor": self.rope_scaling_factor,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
        return hf

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Named presets for tests, the demo and benchmarks (tiny) and for the large examples.
PRESETS: dict[str, ModelConfig] = {
    # paced-train's default model (the demo's): the flags' defaults when no --model is given.
    "tiny": ModelConfig(architecture="llama", num_layers=4, hidden_size=128, ffn_hidden_size=384,
                        num_attention_heads=4, num_query_groups=2, max_position_embeddings=64),
    "tiny-llama": ModelConfig(architecture="llama"),
    "tiny-qwen2": ModelConfig(architecture="qwen2", untie_embeddings_and_output_weights=False),
    "tiny-qwen3": ModelConfig(architecture="qwen3", kv_channels=32, rotary_base=1e6),
    "smollm2-135m": ModelConfig(
        architecture="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
        num_attention_heads=9, num_query_groups=3, vocab_size=49152,
        max_position_embeddings=8192, rotary_base=100000.0,
        untie_embeddings_and_output_weights=False, norm_epsilon=1e-5,
    ),
    # Qwen/Qwen2.5-1.5B, -3B and -7B (RoPE theta 1e6, as their config.json; a converted
    # checkpoint of any other theta is refused by --load as another model).
    "qwen2.5-1.5b": ModelConfig(
        architecture="qwen2", num_layers=28, hidden_size=1536, ffn_hidden_size=8960,
        num_attention_heads=12, num_query_groups=2, vocab_size=151936,
        max_position_embeddings=32768, rotary_base=1_000_000.0, norm_epsilon=1e-6,
        untie_embeddings_and_output_weights=False,
    ),
    "qwen2.5-3b": ModelConfig(
        architecture="qwen2", num_layers=36, hidden_size=2048, ffn_hidden_size=11008,
        num_attention_heads=16, num_query_groups=2, vocab_size=151936,
        max_position_embeddings=32768, rotary_base=1_000_000.0, norm_epsilon=1e-6,
        untie_embeddings_and_output_weights=False,
    ),
    "qwen2.5-7b": ModelConfig(
        architecture="qwen2", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
        num_attention_heads=28, num_query_groups=4, vocab_size=152064,
        max_position_embeddings=32768, rotary_base=1_000_000.0, norm_epsilon=1e-6,
    ),
    # Qwen/Qwen2.5-32B: 32,763,876,352 parameters.
    "qwen2.5-32b": ModelConfig(
        architecture="qwen2", num_layers=64, hidden_size=5120, ffn_hidden_size=27648,
        num_attention_heads=40, num_query_groups=8, vocab_size=152064,
        max_position_embeddings=131072, rotary_base=1_000_000.0, norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
    ),
    # meta-llama/Meta-Llama-3-70B: 70,553,706,496 parameters.
    "llama3-70b": ModelConfig(
        architecture="llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
        num_attention_heads=64, num_query_groups=8, vocab_size=128256,
        max_position_embeddings=8192, rotary_base=500_000.0, norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
    ),
}


def resolve_model_config(
    model: Optional[str], hf_config: Optional[str], overrides: ModelConfig | None = None
) -> ModelConfig:
    """Pick the model config from ``--hf-config``, else ``--model PRESET``, else the flags."""
    if model and hf_config:
        raise ConfigError(f"--model {model!r} and --hf-config {hf_config!r}: give one, not both")
    if hf_config:
        return ModelConfig.from_hf_config(hf_config)
    if model:
        if model not in PRESETS:
            raise ConfigError(
                f"--model {model!r}: unknown preset; choose from {', '.join(PRESETS)} "
                "or pass --hf-config"
            )
        return PRESETS[model]
    return overrides or ModelConfig()
