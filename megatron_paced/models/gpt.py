"""Build Megatron-Core ``GPTModel`` stages for Llama/Qwen2/Qwen3-style configs.

One call gives this rank's pipeline stage of the model, split over its TP group, with
Megatron's own modules: the Transformer Engine layer spec when TE imports on a GPU, the
local spec (pure PyTorch, what runs on the CPU) otherwise. Weights are initialized by
:func:`~megatron_paced.models.sharding.init_layout_invariant_`, so the same seed gives the
same model on every TP/PP layout.

The mapping from our :class:`~megatron_paced.models.config.ModelConfig` to Megatron:

    RMSNorm(eps)             normalization="RMSNorm", layernorm_epsilon
    SwiGLU                   gated_linear_unit=True, activation_func=silu, no linear biases
    RoPE(theta[, llama3])    position_embedding_type="rope", rotary_base, rope_scaling
    GQA                      num_query_groups, kv_channels (head dim)
    QKV bias (Qwen2)         add_qkv_bias=True
    QK-norm (Qwen3)          qk_layernorm=True (RMSNorm over the head dim)
    tied embeddings          share_embeddings_and_output_weights

Usage::

    ctx = initialize_parallel(parallel_cfg, seed=1)
    model = build_gpt_model(PRESETS["tiny-qwen3"], ctx, seed=1)   # this rank's stage
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from megatron_paced.models.config import ModelConfig
from megatron_paced.models.sharding import init_layout_invariant_
from megatron_paced.parallel import ParallelContext


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        if getattr(err, "name", "") not in ("transformer_engine", None):
            warnings.warn(f"Transformer Engine is installed but does not import ({err}); "
                          "using Megatron's local layer spec (slower, no FP8)", stacklevel=2)
        return False
    except Exception as err:  # noqa: BLE001 - a TE build that does not match this torch/CUDA
        warnings.warn(f"Transformer Engine is installed but does not import "
                      f"({type(err).__name__}: {err}); using Megatron's local layer spec "
                      "(slower, no FP8)", stacklevel=2)
        return False
    return True


# The same weights under Megatron's two layer specs: TE fuses the norms into the next linear
# (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec); the local spec's
# ``sharded_state_dict_keys_map`` already writes checkpoints under TE's names, so
# checkpoints agree, and these names make parameter dicts agree too.
TE_TO_LOCAL_NAMES = {".self_attention.linear_qkv.layer_norm_": ".input_layernorm.",
                     ".mlp.linear_fc1.layer_norm_": ".pre_mlp_layernorm."}


def canonical_param_name(name: str) -> str:
    """A parameter's name under the local spec, whichever spec built the model."""
    for te_part, local_part in TE_TO_LOCAL_NAMES.items():
        if te_part in name:
            return name.replace(te_part, local_part)
    return name


def _leave_uninitialized(weight: torch.Tensor) -> None:
    """Init method that does nothing: init_layout_invariant_ fills the weights."""


def transformer_config(
    model_cfg: ModelConfig, ctx: ParallelContext, *, params_dtype: torch.dtype = torch.float32
):
    """Megatron's ``TransformerConfig`` for this model on this layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_cfg.validate(ctx.config)
    on_cpu = ctx.device.type == "cpu"
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.spec.add_qkv_bias,
        qk_layernorm=model_cfg.spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=ctx.config.tensor_model_parallel_size,
        pipeline_model_parallel_size=ctx.config.pipeline_model_parallel_size,
        sequence_parallel=ctx.config.sequence_parallel,
        **_recompute(ctx.config.recompute_granularity),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Weights are filled by init_layout_invariant_ after the build (Megatron's own init
        # differs between PP layouts). Initialization stays "on" because Megatron sets the
        # TP attributes of split weights (partition_dim, ...) inside its init routine.
        perform_initialization=True,
        init_method=_leave_uninitialized,
        output_layer_init_method=_leave_uninitialized,
        embedding_init_method=_leave_uninitialized,
        use_cpu_initialization=on_cpu,
        # Fused kernels need CUDA; the unfused paths are numerically the reference.
        bias_activation_fusion=not on_cpu and transformer_engine_available(),
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Losses return (sum, count, logs); Megatron normalizes once by the global count.
        calculate_per_token_loss=True,
        # On gloo, batched p2p gives wrong results with interleaving; plain p2p is correct.
        batch_p2p_comm=not on_cpu,
        deallocate_pipeline_outputs=False,
    )


def _recompute(granularity: str) -> dict:
    if granularity == "none":
        return {}
    if granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": 1}


def layer_spec(model_cfg: ModelConfig):
    """TE layer spec on a GPU with Transformer Engine, Megatron's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model_cfg.spec.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=model_cfg.spec.qk_layernorm, normalization="RMSNorm"
    )


def build_gpt_model(
    model_cfg: ModelConfig,
    ctx: ParallelContext,
    *,
    seed: int,
    params_dtype: torch.dtype = torch.float32,
    initialize: bool = True,
):
    """This rank's pipeline stage of the model, TP-split, initialized layout-invariantly
    (``initialize=False``: left uninitialized, for weights that are loaded next)."""
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model_cfg, ctx, params_dtype=params_dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg),
        vocab_size=model_cfg.padded_vocab_size(ctx.tp_size),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=ctx.is_first_stage,
        post_process=ctx.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
        rope_scaling=model_cfg.rope_scaling_factor is not None,
        rope_scaling_factor=model_cfg.rope_scaling_factor or 8.0,
        pg_collection=ctx.pg,
    )
    # Megatron's local-spec norms are torch modules made in fp32 whatever params_dtype says; as
    # Megatron's Float16Module does, the whole stage takes the one dtype.
    model.to(device=ctx.device, dtype=params_dtype)
    if not initialize:
        return model
    init_layout_invariant_(
        model,
        seed=seed,
        init_std=model_cfg.init_method_std,
        num_layers=model_cfg.num_layers,
        vocab_size=model_cfg.vocab_size,
        tp_rank=ctx.tp_rank,
        tp_size=ctx.tp_size,
    )
    return model
