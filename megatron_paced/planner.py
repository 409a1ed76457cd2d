"""Parallelism memory planner: bytes per GPU of a TP x PP x DP layout, before launching.

For a model shape and a GPU count, every layout ``TP x PP x DP = num_gpus`` is checked: the
divisibility rules Megatron enforces, then the peak memory of the worst GPU (the first
pipeline stage, or the last one when the logits dominate), as the sum of these terms:

    term          bytes per GPU (P = this rank's parameters: its TP shard of its PP stage)
    ------------  -------------------------------------------------------------------------
    weights       2 P                  bf16 model parameters (4 P with --params-dtype fp32)
    gradients     4 P                  fp32 grad buffer (Megatron DDP, grad_reduce_in_fp32)
    optimizer     12 P / DP            fp32 main params + Adam m + v, sharded over DP by the
                                       distributed optimizer (12 P without it; fp32 params
                                       are their own main copy: 8 P / DP)
    activations   see below            saved for backward, times the microbatches in flight
    logits        see below            last stage: logits and log-softmax buffers
    reference     2 P                  frozen reference, same dtype and layout (0 when it is
                                       parked on the host or not built)
    sglang        f x GPU memory       a colocated SGLang's static pool (weights + KV cache)
    reserved      a constant           CUDA context, NCCL buffers, allocator fragmentation

weights + gradients + optimizer is Megatron's own figure of 6 + 12/d bytes per parameter
(bf16 params, fp32 grads, distributed optimizer; 18 without it; 8 + 8/d and 16 for fp32
params), from the Megatron-Core distributed optimizer guide,
https://docs.nvidia.com/megatron-core/developer-guide/latest/api-guide/dist_optimizer.html .
The fp32 main copy of the weights is counted once, under ``optimizer``.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198): with tensor and sequence parallelism a GPT layer saves
``s b h (34 + 5 a s / h) / t`` bytes (bf16) without recomputation, ``34 s b h / t`` with
selective recomputation (core attention recomputed) and ``2 s b h / t`` with full
recomputation. The 34 is a sum of named tensors; :func:`activation_bytes_per_token` redoes that
sum for a Llama/Qwen layer (bf16 bytes per token, per layer, before the division by TP; fp32
doubles them):

    RMSNorm inputs (2 norms)                 4 h
    QKV projection input                     2 h
    Q, K, V after RoPE (GQA: g KV heads)     2 a d + 4 g d
    QK-norm inputs (Qwen3 only)              2 a d + 2 g d
    core-attention output (proj input)       2 a d
    fc1 input                                2 h
    SwiGLU input (gate and up, fused)        4 F
    fc2 input                                2 F
    core attention (recompute none only)     5 a s          (softmax, its dropout mask and
                                                             output: the paper's 5 a s^2 b)

The paper's 34 h also holds two dropout masks (1 h each); our models train without dropout,
which PyTorch then skips, so they are left out. For multi-head attention (g = a, a d = h) and
F = 8h/3 this table is exactly the paper's 34 h minus those masks. Flash attention (Transformer
Engine's default on H100) never stores the ``5 a s`` term, so ``none`` overestimates such a run
and ``selective`` is its figure. Full recomputation keeps ``2 h`` per layer (its input) plus
one layer's ``none`` activations while that layer is recomputed during the backward pass.

With 1F1B the first stage holds PP microbatches in flight (enough microbatches per step are
assumed), so it stores the activations of all ``L`` layers' worth; the last stage holds one
microbatch, plus the logits: 16 bytes per local vocabulary entry per token (bf16 logits, the
padding-masked copy, and the fp32 upcast, shifted and softmax tensors of
:mod:`megatron_paced.logprobs`). With TP > 1 sequence parallelism is assumed (activations
divided by TP; the sequence length must divide by TP).

Host memory (not counted against the GPU): the parked reference, and the log-Z table, which
:class:`~megatron_paced.paced.log_z.ShardedLogZ` keeps on the CPU in float64 with an int64
visit count and float64 Adam moments: 32 bytes per prompt, ``ceil(num_prompts / DP)`` prompts
per rank.

Usage::

    model = resolve_model("qwen2.5-7b")                  # or a config.json / its folder
    settings = PlannerSettings(seq_length=4096, recompute="selective")
    for plan in plan_layouts(model, num_gpus=8, settings=settings):
        print(plan.layout, plan.fits, plan.reason or f"{gib(plan.memory.total):.1f} GiB")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_paced.config import ConfigError, require
from megatron_paced.models.config import ModelConfig
from megatron_paced.models.counting import count_rank_parameters

GIB = 1024**3

BYTES_PER_VALUE = {"bf16": 2, "fp32": 4}
GRAD_BYTES_PER_PARAM = 4
"""fp32 main-grad buffer (Megatron DDP with grad_reduce_in_fp32; not sharded over DP)."""
OPTIMIZER_BYTES_PER_PARAM = {"bf16": 12, "fp32": 8}
"""Divided by DP with the distributed optimizer. bf16 params: fp32 main params + Adam exp_avg
+ exp_avg_sq; fp32 params are their own main copy: exp_avg + exp_avg_sq."""
LOGIT_BYTES_PER_ENTRY = 16
"""Per token and local vocabulary entry on the last stage: bf16 logits (2), padding-masked
copy (2), fp32 upcast (4), shifted (4), exp/softmax kept for backward (4)."""
LOG_Z_BYTES_PER_PROMPT = 32
"""ShardedLogZ: float64 value, int64 visits, float64 Adam exp_avg and exp_avg_sq (host)."""

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_CHOICES: tuple[str, ...] = ("none", "selective", "full")
ParamsDtype = Literal["bf16", "fp32"]
ReferencePlace = Literal["gpu", "host", "none"]




@dataclass(frozen=True)
class PlannerSettings:
    """What a training step of the RL loop holds on each GPU, besides the model's shape."""

    micro_batch_size: int = 1
    """Sequences per microbatch."""
    seq_length: int = 4096
    """Tokens per sequence (prompt + response)."""
    recompute: Recompute = "selective"
    """Activation recomputation: none, selective (core attention) or full (every layer)."""
    params_dtype: ParamsDtype = "bf16"
    """Dtype of the weights and activations: bf16 (mixed precision, fp32 main params and
    grads) or fp32 (what build_policy builds unless told otherwise)."""
    gpu_memory: float = 80.0
    """Memory of one GPU, in GiB."""
    gpus_per_node: int = 8
    """GPUs per node: tensor parallelism stays inside a node."""
    use_distributed_optimizer: bool = True
    """Shard fp32 main params and Adam state over DP (Megatron's distributed optimizer)."""
    reference: ReferencePlace = "gpu"
    """The frozen reference model: on the gpu, parked on the host between uses, or none (PACED
    builds none; FlowRL and GRPO with a KL term do)."""
    colocate_sglang: bool = False
    """An SGLang server shares each GPU and keeps its static pool during training."""
    sglang_mem_fraction: float = 0.3
    """SGLang's --mem-fraction-static: the share of GPU memory it holds (weights + KV cache)."""
    num_prompts: int = 0
    """Prompts in the log-Z table (host memory, sharded over DP)."""
    reserved_gib: float = 4.0
    """Set aside per GPU for the CUDA context, NCCL buffers and allocator fragmentation."""

    def validate(self) -> None:
        for name in ("micro_batch_size", "seq_length", "gpus_per_node"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.recompute in RECOMPUTE_CHOICES, "recompute", self.recompute,
                f"choose from {', '.join(RECOMPUTE_CHOICES)}")
        require(self.params_dtype in BYTES_PER_VALUE, "params_dtype", self.params_dtype,
                "choose from bf16, fp32")
        require(self.reference in ("gpu", "host", "none"), "reference", self.reference,
                "choose from gpu, host, none")
        require(self.gpu_memory > 0, "gpu_memory", self.gpu_memory, "must be > 0 (GiB)")
        require(0 < self.sglang_mem_fraction < 1, "sglang_mem_fraction",
                self.sglang_mem_fraction, "must be in (0, 1)")
        require(self.num_prompts >= 0, "num_prompts", self.num_prompts, "must be >= 0")
        require(self.reserved_gib >= 0, "reserved_gib", self.reserved_gib, "must be >= 0")


@dataclass(frozen=True)
class Layout:
    """Tensor x pipeline x data parallel sizes."""

    tp: int
    pp: int
    dp: int

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}"


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU of one pipeline stage, by what holds them (see the module docstring)."""

    weights: int
    """The policy's parameters (bf16 or fp32)."""
    gradients: int
    """fp32 grad buffer."""
    optimizer: int
    """fp32 main params (bf16 runs) and Adam moments, this rank's DP shard."""
    activations: int
    """Saved for backward by the stage's layers, all microbatches in flight."""
    logits: int
    """Last stage: one microbatch's logits and log-softmax buffers."""
    reference: int
    """The frozen reference's parameters, when kept on the GPU."""
    sglang: int
    """A colocated SGLang's static pool."""
    reserved: int
    """CUDA context, NCCL buffers, fragmentation."""
    host_reference: int
    """The parked reference, in host memory (not part of ``total``)."""
    host_log_z: int
    """This rank's log-Z shard, in host memory (not part of ``total``)."""

    DEVICE_TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "reference",
                    "sglang", "reserved")

    @property
    def total(self) -> int:
        """GPU bytes: every term but the host ones."""
        return sum(getattr(self, name) for name in self.DEVICE_TERMS)

    @property
    def host(self) -> int:
        return self.host_reference + self.host_log_z


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one pipeline stage on one GPU."""

    per_layer_microbatch: int
    """Saved by one layer for one microbatch (full recompute: the layer's input)."""
    layers: int
    """All layers of the stage times the microbatches in flight."""
    recompute_working_set: int
    """Full recompute only: one layer's activations while it is recomputed."""
    output_layer: int
    """Last stage: the final norm's input and the output layer's input."""

    @property
    def total(self) -> int:
        return self.layers + self.recompute_working_set + self.output_layer


@dataclass(frozen=True)
class StagePlan:
    """Memory of one pipeline stage (per GPU)."""

    name: str
    """first, last, or only (PP 1)."""
    num_params: int
    """Parameters of this GPU: its TP shard of the stage (padded vocabulary)."""
    activations: ActivationBytes
    memory: MemoryBreakdown


@dataclass(frozen=True)
class LayoutPlan:
    """The verdict on one layout."""

    layout: Layout
    problems: tuple[str, ...]
    """Why the layout cannot be built (empty if it can)."""
    stages: tuple[StagePlan, ...] = ()
    """first and last stage (one entry with PP 1); empty when ``problems``."""
    gpu_memory: int = 0
    """Bytes of one GPU."""

    @property
    def worst(self) -> StagePlan | None:
        return max(self.stages, key=lambda s: s.memory.total) if self.stages else None

    @property
    def memory(self) -> MemoryBreakdown | None:
        return self.worst.memory if self.worst else None

    @property
    def fits(self) -> bool:
        return not self.problems and self.memory.total <= self.gpu_memory

    @property
    def reason(self) -> str:
        """Why it does not fit, in words; empty if it fits."""
        if self.problems:
            return "; ".join(self.problems)
        if self.fits:
            return ""
        return memory_shortfall(self.worst, self.gpu_memory, multi_stage=len(self.stages) > 1)


def gib(num_bytes: float) -> float:
    return num_bytes / GIB


# ---- activations ----------------------------------------------------------------------------
def activation_bytes_per_token(model: ModelConfig, recompute: str, seq_length: int,
                               params_dtype: str = "bf16") -> int:
    """Bytes one transformer layer saves for backward per token (before dividing by TP).

    ``none``: every tensor of the table in the module docstring; ``selective``: without the
    core-attention term; ``full``: the layer's input only. The table is in bf16 bytes; fp32
    doubles every value (the dropout mask stays 1 byte).
    """
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    a, g = model.num_attention_heads, model.num_query_groups
    bytes_per_value = BYTES_PER_VALUE[params_dtype]
    if recompute == "full":
        return bytes_per_value * h
    values = (
        2 * h                 # inputs of the two RMSNorms
        + h                   # QKV projection input
        + a * d + 2 * g * d   # Q, K, V after RoPE (K and V at the KV-head count)
        + a * d               # core-attention output = output-projection input
        + h                   # fc1 input
        + 2 * f               # SwiGLU input (gate and up halves)
        + f                   # fc2 input
    )
    if model.spec.qk_layernorm:
        values += a * d + g * d  # inputs of the per-head Q and K RMSNorms
    saved = bytes_per_value * values
    if recompute == "none":
        # Softmax output, dropout mask (1 byte), dropout output: the paper's 5 a s^2 b in bf16.
        saved += (2 * bytes_per_value + 1) * a * seq_length
    return saved


def stage_activation_bytes(model: ModelConfig, layout: Layout, settings: PlannerSettings,
                           pp_rank: int) -> ActivationBytes:
    """Activations one GPU of pipeline stage ``pp_rank`` holds at its peak under 1F1B."""
    tp, pp = layout.tp, layout.pp
    tokens = settings.micro_batch_size * settings.seq_length
    in_flight = pp - pp_rank  # 1F1B: warm-up microbatches + the one in its forward pass
    dtype = settings.params_dtype
    per_layer = tokens * activation_bytes_per_token(model, settings.recompute,
                                                     settings.seq_length, dtype) // tp
    working_set = 0
    if settings.recompute == "full":
        working_set = tokens * activation_bytes_per_token(model, "none", settings.seq_length,
                                                           dtype) // tp
    output_layer = 0
    if pp_rank == pp - 1:  # inputs of the final norm and of the output layer
        output_layer = tokens * 2 * BYTES_PER_VALUE[dtype] * model.hidden_size // tp
    return ActivationBytes(
        per_layer_microbatch=per_layer,
        layers=per_layer * (model.num_layers // pp) * in_flight,
        recompute_working_set=working_set,
        output_layer=output_layer,
    )


def stage_logit_bytes(model: ModelConfig, layout: Layout, settings: PlannerSettings,
                      pp_rank: int) -> int:
    """Last stage only: one microbatch's logits and log-softmax buffers on one GPU."""
    if pp_rank != layout.pp - 1:
        return 0
    tokens = settings.micro_batch_size * settings.seq_length
    return tokens * LOGIT_BYTES_PER_ENTRY * (model.padded_vocab_size(layout.tp) // layout.tp)


# ---- layouts --------------------------------------------------------------------------------
def enumerate_layouts(num_gpus: int) -> list[Layout]:
    """Every TP x PP x DP with product ``num_gpus``."""
    divisors = [n for n in range(1, num_gpus + 1) if num_gpus % n == 0]
    return [Layout(tp, pp, num_gpus // (tp * pp))
            for tp in divisors for pp in divisors if num_gpus % (tp * pp) == 0]


def layout_problems(model: ModelConfig, layout: Layout, settings: PlannerSettings) -> list[str]:
    """Why Megatron could not build this layout, in words (empty: it can)."""
    tp, pp = layout.tp, layout.pp
    problems = []
    if tp > settings.gpus_per_node:
        problems.append(f"TP {tp} spans more than one {settings.gpus_per_node}-GPU node")
    for value, what in ((model.num_attention_heads, "heads"),
                        (model.num_query_groups, "KV heads"),
                        (model.ffn_hidden_size, "FFN width")):
        if value % tp:
            problems.append(f"TP {tp} does not divide {value} {what}")
    if model.num_layers % pp:
        problems.append(f"PP {pp} does not divide {model.num_layers} layers")
    if tp > 1 and settings.seq_length % tp:
        problems.append(f"TP {tp} does not divide sequence length {settings.seq_length} "
                        "(sequence parallelism)")
    return problems


def plan_stage(model: ModelConfig, layout: Layout, settings: PlannerSettings,
               pp_rank: int) -> StagePlan:
    """Parameters and memory of one GPU of pipeline stage ``pp_rank``."""
    num_params = count_rank_parameters(model, layout.tp, layout.pp, pp_rank)
    activations = stage_activation_bytes(model, layout, settings, pp_rank)
    optimizer_shards = layout.dp if settings.use_distributed_optimizer else 1
    weights = BYTES_PER_VALUE[settings.params_dtype] * num_params
    memory = MemoryBreakdown(
        weights=weights,
        gradients=GRAD_BYTES_PER_PARAM * num_params,
        optimizer=math.ceil(OPTIMIZER_BYTES_PER_PARAM[settings.params_dtype] * num_params
                            / optimizer_shards),
        activations=activations.total,
        logits=stage_logit_bytes(model, layout, settings, pp_rank),
        reference=weights if settings.reference == "gpu" else 0,
        sglang=(int(settings.sglang_mem_fraction * settings.gpu_memory * GIB)
                if settings.colocate_sglang else 0),
        reserved=int(settings.reserved_gib * GIB),
        host_reference=weights if settings.reference == "host" else 0,
        host_log_z=LOG_Z_BYTES_PER_PROMPT * math.ceil(settings.num_prompts / layout.dp),
    )
    if layout.pp == 1:
        name = "only"
    else:
        name = "first" if pp_rank == 0 else "last" if pp_rank == layout.pp - 1 else "middle"
    return StagePlan(name=name, num_params=num_params, activations=activations, memory=memory)


def plan_layout(model: ModelConfig, layout: Layout, settings: PlannerSettings) -> LayoutPlan:
    """Memory of the first and last pipeline stage of ``layout``, or why it cannot be built.

    Middle stages hold fewer microbatches than the first and no embedding or logits, so they
    never need more than the larger of the two.
    """
    gpu_memory = int(settings.gpu_memory * GIB)
    problems = layout_problems(model, layout, settings)
    if problems:
        return LayoutPlan(layout, tuple(problems), gpu_memory=gpu_memory)
    ranks = [0] if layout.pp == 1 else [0, layout.pp - 1]
    stages = tuple(plan_stage(model, layout, settings, r) for r in ranks)
    return LayoutPlan(layout, (), stages, gpu_memory)


def preference_key(plan: LayoutPlan) -> tuple:
    """Fitting layouts first; then the fewest GPUs per model replica (most DP), then the
    least pipelining (TP inside a node is cheaper than a pipeline bubble)."""
    return (not plan.fits, bool(plan.problems), plan.layout.model_parallel_size, plan.layout.pp)


def plan_layouts(model: ModelConfig, num_gpus: int, settings: PlannerSettings
                 ) -> list[LayoutPlan]:
    """Every layout of ``num_gpus``, best first (see :func:`preference_key`)."""
    if num_gpus < 1:
        raise ConfigError(f"--gpus {num_gpus}: must be >= 1")
    settings.validate()
    plans = [plan_layout(model, layout, settings) for layout in enumerate_layouts(num_gpus)]
    return sorted(plans, key=preference_key)


def check_layout(model: ModelConfig, num_gpus: int, tp: int, pp: int,
                 settings: PlannerSettings) -> LayoutPlan:
    """The plan of one layout given as TP and PP (DP = num_gpus / (TP x PP))."""
    settings.validate()
    for name, value in (("gpus", num_gpus), ("tp", tp), ("pp", pp)):
        if value < 1:
            raise ConfigError(f"--{name} {value}: must be >= 1")
    if num_gpus % (tp * pp):
        raise ConfigError(f"--gpus {num_gpus} is not divisible by --tp {tp} x --pp {pp} "
                          f"= {tp * pp}")
    return plan_layout(model, Layout(tp, pp, num_gpus // (tp * pp)), settings)


def memory_shortfall(stage: StagePlan, gpu_memory: int, *, multi_stage: bool) -> str:
    """``needs 91.2 GiB > 80 GiB: optimizer 40.1 GiB, ...`` (terms largest first)."""
    memory = stage.memory
    terms = sorted(((getattr(memory, n), n) for n in MemoryBreakdown.DEVICE_TERMS),
                   key=lambda t: -t[0])
    listed = ", ".join(f"{name} {gib(value):.1f} GiB" for value, name in terms if value)
    where = f" on the {stage.name} stage" if multi_stage else ""
    return f"needs {gib(memory.total):.1f} GiB > {gib(gpu_memory):g} GiB{where}: {listed}"
