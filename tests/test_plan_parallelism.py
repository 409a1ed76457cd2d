"""The parallelism memory planner (megatron_paced/planner.py) and its CLI.

* Parameter counts equal the published ones exactly, and each GPU's share equals
  ``sum(p.numel())`` of the Megatron-Core ``GPTModel`` stage built for that rank.
* The activation formula: the paper's 34 h for GPT shapes, the 1F1B in-flight rule, and the
  bytes a real ``GPTModel`` forward saves for backward on the CPU, which equal the planner's
  figure plus a short list of named terms that exist only on the CPU path (unfused RMSNorm,
  SwiGLU and attention; see docs/planner.md).
* The CLI: a table best-first, one-layout checks, reasons in words, exit status 2 and one line
  on stderr for bad input.

The Megatron measurements run in ONE subprocess (Megatron takes ~5 s to import) that plays
every rank of every layout itself: torch's "fake" process group (as torchtitan's memory
estimator does) gives each rank its coordinates with no peers, so a whole TP x PP grid is
built in one process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_paced.config import ConfigError
from megatron_paced.models.config import PRESETS, ModelConfig
from megatron_paced.models.counting import count_parameters, count_rank_parameters, resolve_model
from megatron_paced.planner import (
    GIB,
    Layout,
    PlannerSettings,
    activation_bytes_per_token,
    check_layout,
    plan_layout,
    plan_layouts,
    stage_activation_bytes,
)
from tests.conftest import run_python
from tools.plan_parallelism import main

REPO = Path(__file__).resolve().parents[1]

# ---- parameter counts -----------------------------------------------------------------------

PUBLISHED_PARAMS = {  # exact counts of the Hugging Face checkpoints
    "smollm2-135m": 134_515_008,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-32b": 32_763_876_352,
    "llama3-70b": 70_553_706_496,
}
ROUNDED_PARAMS = {  # as usually quoted: (figure, unit of its last digit)
    "smollm2-135m": (134.5e6, 0.1e6), "qwen2.5-1.5b": (1.54e9, 0.01e9),
    "qwen2.5-3b": (3.09e9, 0.01e9), "qwen2.5-7b": (7.62e9, 0.01e9),
    "qwen2.5-32b": (32.76e9, 0.01e9), "llama3-70b": (70.55e9, 0.01e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_are_exact(name):
    count = count_parameters(resolve_model(name))
    assert count == PUBLISHED_PARAMS[name]
    figure, last_digit = ROUNDED_PARAMS[name]
    assert abs(count - figure) <= last_digit / 2


def test_named_shapes():
    qwen32, llama70 = resolve_model("qwen2.5-32b"), resolve_model("llama3-70b")
    assert (qwen32.num_layers, qwen32.hidden_size, qwen32.ffn_hidden_size,
            qwen32.num_attention_heads, qwen32.num_query_groups, qwen32.vocab_size,
            qwen32.untie_embeddings_and_output_weights, qwen32.architecture) == (
        64, 5120, 27648, 40, 8, 152064, True, "qwen2")
    assert (llama70.num_layers, llama70.hidden_size, llama70.ffn_hidden_size,
            llama70.num_attention_heads, llama70.num_query_groups, llama70.vocab_size,
            llama70.untie_embeddings_and_output_weights, llama70.rotary_base) == (
        80, 8192, 28672, 64, 8, 128256, True, 500000.0)


def _hf_config(cfg: ModelConfig, architecture: str) -> dict:
    return {"architectures": [architecture], "num_hidden_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_query_groups, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rope_theta": cfg.rotary_base}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--model 'qwen-7b': unknown model name; known: .*"
                                          r"llama3-70b.*qwen2.5-32b"):
        resolve_model("qwen-7b")


def test_config_json_file_or_folder(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(_hf_config(PRESETS["qwen2.5-7b"], "Qwen2ForCausalLM")))
    for source in (tmp_path, tmp_path / "config.json"):
        assert count_parameters(resolve_model(str(source))) == PUBLISHED_PARAMS["qwen2.5-7b"]


# ---- memory terms ---------------------------------------------------------------------------

def test_static_bytes_are_megatron_distributed_optimizer_figures():
    """6 + 12/d bytes per parameter with the distributed optimizer, 18 without it (Megatron's
    distributed-optimizer guide: bf16 params, fp32 grads); the reference adds 2."""
    model = resolve_model("qwen2.5-7b")
    for dp, dist_opt, per_param in ((4, True, 6 + 12 / 4), (1, True, 18), (4, False, 18)):
        plan = plan_layout(model, Layout(2, 1, dp),
                           PlannerSettings(use_distributed_optimizer=dist_opt))
        (stage,) = plan.stages
        static = stage.memory.weights + stage.memory.gradients + stage.memory.optimizer
        assert static == pytest.approx(per_param * stage.num_params, abs=1)
        assert stage.memory.reference == 2 * stage.num_params
    for dp, dist_opt, per_param in ((4, True, 8 + 8 / 4), (4, False, 16)):
        plan = plan_layout(model, Layout(2, 1, dp), PlannerSettings(
            params_dtype="fp32", use_distributed_optimizer=dist_opt, reference="none"))
        (stage,) = plan.stages
        static = stage.memory.weights + stage.memory.gradients + stage.memory.optimizer
        assert static == pytest.approx(per_param * stage.num_params, abs=1)
        assert stage.memory.reference == 0


def test_korthikanti_34_for_gpt_shapes():
    """Multi-head attention and F = 8h/3 (SwiGLU with a 4h-GELU's parameter count): our
    per-layer sum is the paper's 34 sbh minus its two dropout masks (sbh each), plus 5as^2b
    without recomputation, and 2sbh with full recomputation."""
    h, a, s = 3072, 24, 4096
    gpt_like = ModelConfig(architecture="llama", hidden_size=h, ffn_hidden_size=8 * h // 3,
                           num_attention_heads=a, num_query_groups=a, num_layers=4)
    assert activation_bytes_per_token(gpt_like, "selective", s) == (34 - 2) * h
    assert activation_bytes_per_token(gpt_like, "none", s) == (34 - 2) * h + 5 * a * s
    assert activation_bytes_per_token(gpt_like, "full", s) == 2 * h
    assert activation_bytes_per_token(gpt_like, "selective", s, "fp32") == 2 * (34 - 2) * h
    assert activation_bytes_per_token(gpt_like, "none", s, "fp32") == 2 * (34 - 2) * h + 9 * a * s


def test_activations_scale_with_tp_and_1f1b_in_flight_microbatches():
    model, s = resolve_model("llama3-70b"), PlannerSettings(seq_length=4096)
    per_token = activation_bytes_per_token(model, "selective", 4096)
    for tp, pp in ((1, 1), (8, 1), (8, 4), (2, 16)):
        first = stage_activation_bytes(model, Layout(tp, pp, 1), s, pp_rank=0)
        last = stage_activation_bytes(model, Layout(tp, pp, 1), s, pp_rank=pp - 1)
        # The first stage keeps PP microbatches of L/PP layers: all L layers' worth.
        assert first.layers == 4096 * per_token // tp * model.num_layers
        assert last.layers == first.layers // pp
        assert last.output_layer == 4096 * 4 * model.hidden_size // tp
    full = stage_activation_bytes(model, Layout(8, 4, 1),
                                  dataclasses.replace(s, recompute="full"), pp_rank=0)
    assert full.per_layer_microbatch == 4096 * 2 * model.hidden_size // 8
    assert full.recompute_working_set == 4096 * activation_bytes_per_token(
        model, "none", 4096) // 8


def test_sglang_reference_and_log_z_terms():
    model = resolve_model("qwen2.5-7b")
    base = plan_layout(model, Layout(2, 1, 4), PlannerSettings()).memory
    colocated = plan_layout(model, Layout(2, 1, 4), PlannerSettings(
        colocate_sglang=True, sglang_mem_fraction=0.3, reference="host",
        num_prompts=7473)).memory
    assert colocated.sglang == int(0.3 * 80 * GIB)
    assert colocated.reference == 0 and colocated.host_reference == base.reference
    assert colocated.host_log_z == 32 * 1869  # ceil(7473 / 4) rows of 32 bytes, on the host
    assert colocated.total == base.total - base.reference + colocated.sglang


# ---- layouts --------------------------------------------------------------------------------

def test_every_divisor_layout_is_listed_best_first():
    plans = plan_layouts(resolve_model("qwen2.5-7b"), 8, PlannerSettings())
    assert sorted((p.layout.tp, p.layout.pp) for p in plans) == sorted(
        (tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8) if tp * pp <= 8)
    fitting = [p for p in plans if p.fits]
    assert plans[:len(fitting)] == fitting  # fitting layouts come first
    sizes = [(p.layout.tp * p.layout.pp, p.layout.pp) for p in fitting]
    assert sizes == sorted(sizes)
    assert str(fitting[0].layout) == "TP2 PP1 DP4"


def test_reasons_in_words():
    model = resolve_model("qwen2.5-7b")
    assert plan_layout(model, Layout(3, 1, 1), PlannerSettings()).reason == (
        "TP 3 does not divide 28 heads; TP 3 does not divide 4 KV heads; TP 3 does not divide "
        "18944 FFN width; TP 3 does not divide sequence length 4096 (sequence parallelism)")
    assert "PP 8 does not divide 28 layers" in plan_layout(
        model, Layout(1, 8, 1), PlannerSettings()).reason
    assert "TP 16 spans more than one 8-GPU node" in plan_layout(
        resolve_model("llama3-70b"), Layout(16, 1, 1), PlannerSettings()).reason
    too_big = plan_layout(model, Layout(1, 1, 8), PlannerSettings())
    assert not too_big.fits
    assert too_big.reason.startswith(f"needs {too_big.memory.total / GIB:.1f} GiB > 80 GiB: "
                                     "gradients 28.4 GiB, activations")


@pytest.mark.parametrize("name, gpus, tp, pp", [
    ("qwen2.5-7b", 8, 2, 1), ("qwen2.5-32b", 16, 8, 2), ("llama3-70b", 32, 8, 4)])
def test_example_script_layouts_fit_without_colocated_sglang(name, gpus, tp, pp):
    settings = PlannerSettings(seq_length=4096, micro_batch_size=1, recompute="selective")
    plan = check_layout(resolve_model(name), gpus, tp, pp, settings)
    assert plan.fits, plan.reason


# ---- against Megatron-Core ------------------------------------------------------------------

MEGATRON_PROBE = r"""
import dataclasses, json, sys
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_paced.compat import enable_cpu_compat
from megatron_paced.config import ParallelConfig
from megatron_paced.models.config import ModelConfig
from megatron_paced.models.gpt import build_gpt_model, layer_spec, transformer_config
from megatron_paced.parallel import ParallelContext, silence_known_upstream_warnings

silence_known_upstream_warnings()
enable_cpu_compat()
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

request = json.loads(sys.argv[1])


def as_rank(tp, pp, rank):
    # One process plays `rank` of a tp x pp world: the fake backend has no peers.
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * pp)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    return ParallelContext(pg=ProcessGroupCollection.use_mpu_process_groups(),
                           config=ParallelConfig(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp),
                           rank=rank, world_size=tp * pp, device=torch.device("cpu"))


def leave_rank():
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


params = []
for item in request["params"]:
    cfg, (tp, pp) = ModelConfig(**item["model"]), item["layout"]
    for rank in range(tp * pp):
        ctx = as_rank(tp, pp, rank)
        model = build_gpt_model(cfg, ctx, seed=1)
        params.append({"name": item["name"], "tp": tp, "pp": pp, "pp_rank": ctx.pp_rank,
                       "numel": sum(p.numel() for p in model.parameters())})
        leave_rank()

RECOMPUTE = {"none": {}, "selective": {"recompute_granularity": "selective"},
             "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                      "recompute_num_layers": 1}}
saved = []
ctx = as_rank(1, 1, 0)
for item in request["activations"]:
    cfg, b, s = ModelConfig(**item["model"]), item["batch"], item["seq"]
    config = dataclasses.replace(transformer_config(cfg, ctx, params_dtype=torch.bfloat16),
                                 **RECOMPUTE[item["recompute"]])
    tied = not cfg.untie_embeddings_and_output_weights
    model = GPTModel(config=config, transformer_layer_spec=layer_spec(cfg),
                     vocab_size=cfg.padded_vocab_size(1), max_sequence_length=s,
                     position_embedding_type="rope", pg_collection=ctx.pg,
                     share_embeddings_and_output_weights=tied)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        # Bytes kept alive for backward: each storage once (views share it), weights excluded.
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(s).expand_as(tokens), None)
    saved.append({**item, "bytes": sum(storages.values())})
leave_rank()
print(json.dumps({"params": params, "saved": saved}))
"""

PROBE_MODELS = {
    "tiny-llama": PRESETS["tiny-llama"],
    "tiny-qwen2-tied": PRESETS["tiny-qwen2"],
    "tiny-qwen3": PRESETS["tiny-qwen3"],
    # 8 heads / 4 KV heads for TP 4, a vocabulary Megatron pads (1000 -> 1024 at TP 4).
    "llama-gqa-padded": ModelConfig(architecture="llama", num_layers=4, hidden_size=64,
                                    ffn_hidden_size=96, num_attention_heads=8,
                                    num_query_groups=4, vocab_size=1000),
}
PROBE_LAYOUTS = {name: [(1, 1), (2, 1), (1, 2), (2, 2)] for name in PROBE_MODELS}
PROBE_LAYOUTS["llama-gqa-padded"] += [(4, 1), (1, 4), (4, 2)]
ACTIVATION_MODELS = {
    "llama-gqa": ModelConfig(architecture="llama", num_layers=2, hidden_size=64,
                             ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                             vocab_size=256),
    "qwen2-tied": ModelConfig(architecture="qwen2", num_layers=3, hidden_size=96,
                              ffn_hidden_size=256, num_attention_heads=6, num_query_groups=2,
                              vocab_size=300, untie_embeddings_and_output_weights=False),
    "qwen3-qknorm": ModelConfig(architecture="qwen3", num_layers=2, hidden_size=64,
                                ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                                kv_channels=32, vocab_size=256),
    "llama-mha": ModelConfig(architecture="llama", num_layers=2, hidden_size=64,
                             ffn_hidden_size=96, num_attention_heads=4, num_query_groups=4,
                             vocab_size=256),
}
ACTIVATION_SHAPES = [(1, 128), (2, 64)]  # (micro batch, sequence length)


@pytest.fixture(scope="module")
def megatron_probe() -> dict:
    request = {
        "params": [{"name": name, "model": dataclasses.asdict(PROBE_MODELS[name]),
                    "layout": layout}
                   for name, layouts in PROBE_LAYOUTS.items() for layout in layouts],
        "activations": [{"name": name, "model": dataclasses.asdict(cfg), "recompute": mode,
                         "batch": b, "seq": s}
                        for name, cfg in ACTIVATION_MODELS.items()
                        for mode in ("none", "selective", "full")
                        for b, s in ACTIVATION_SHAPES],
    }
    result = run_python(MEGATRON_PROBE, json.dumps(request), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rank_parameters_equal_megatron_gptmodel(megatron_probe):
    rows = megatron_probe["params"]
    assert len(rows) == sum(tp * pp for layouts in PROBE_LAYOUTS.values()
                            for tp, pp in layouts)
    for row in rows:
        expected = count_rank_parameters(PROBE_MODELS[row["name"]], row["tp"], row["pp"],
                                         row["pp_rank"])
        assert row["numel"] == expected, row


def cpu_only_saved_bytes(cfg: ModelConfig, recompute: str, b: int, s: int) -> int:
    """What the CPU path (Megatron's local layer spec, torch kernels) saves for backward
    beyond the planner's figure, which models the fused GPU kernels. Each term was found by
    listing the saved tensors of one forward (docs/planner.md, "Checking the activations")."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    a, g, num_layers, tokens = cfg.num_attention_heads, cfg.num_query_groups, cfg.num_layers, b * s
    extra = 8 * tokens  # int64 token ids kept by the embedding
    # torch's composite RMSNorm keeps an fp32 upcast input, an fp32 normalized output and an
    # fp32 rstd per row (8h + 4 bytes a token) where a fused norm keeps the bf16 input (2h).
    norm_extra = 6 * h + 4
    extra += tokens * norm_extra  # the final norm
    if recompute == "full":
        return extra + 4 * s * d  # fp32 RoPE frequencies, an input of every checkpointed layer
    per_token = 2 * norm_extra
    per_token += 4 * f  # unfused SwiGLU: silu output and the `x_linear + 0` copy
    if cfg.spec.qk_layernorm:
        per_token += 6 * (a + g) * d + 4 * (a + g)  # the per-head Q/K norms, unfused likewise
    if recompute == "none" and g < a:
        per_token += 4 * (a - g) * d  # K and V repeated to all query heads (copies)
    else:
        # V is a view of the fused QKV output, which stays alive with the pre-RoPE Q and K.
        per_token += 2 * (a + g) * d
    extra += num_layers * tokens * per_token
    extra += num_layers * 4 * s * d * 2  # RoPE cos and sin tables for Q and K, in bf16
    if recompute == "none":
        # fp32 softmax output + its bf16 copy (6as^2b) against the paper's 5as^2b, and the
        # boolean causal mask.
        extra += num_layers * (a * s * s * b + s * s)
    return extra


def test_saved_activations_equal_planner_plus_cpu_only_terms(megatron_probe):
    rows = megatron_probe["saved"]
    assert len(rows) == len(ACTIVATION_MODELS) * 3 * len(ACTIVATION_SHAPES)
    for row in rows:
        cfg, b, s = ACTIVATION_MODELS[row["name"]], row["batch"], row["seq"]
        settings = PlannerSettings(micro_batch_size=b, seq_length=s, recompute=row["recompute"])
        stage = stage_activation_bytes(cfg, Layout(1, 1, 1), settings, pp_rank=0)
        planner = stage.layers + stage.output_layer  # what one forward saves (no working set)
        expected = planner + cpu_only_saved_bytes(cfg, row["recompute"], b, s)
        assert row["bytes"] == pytest.approx(expected, rel=1e-3), row
        assert planner < row["bytes"]


# ---- the CLI --------------------------------------------------------------------------------

def test_table_lists_layouts_best_first_with_marks(capsys):
    assert main(["--model", "qwen2.5-7b", "--gpus", "8", "--mark", "2x1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "7,615,616,512 parameters" in lines[0]
    rows = [line for line in lines if "TP" in line and "DP" in line]
    assert rows[0].startswith("*  1  TP2 PP1 DP4") and "fits" in rows[0]
    assert any("TP 8 does not divide 28 heads" in row for row in rows)
    assert any("needs " in row and "GiB > 80 GiB: gradients" in row for row in rows)


def test_markdown_fits_only(capsys):
    assert main(["--model", "qwen2.5-32b", "--gpus", "16", "--format", "markdown",
                 "--fits-only", "--mark", "8x2"]) == 0
    out = capsys.readouterr().out
    assert "| * |" in out and "TP8 PP2 DP1" in out
    assert "drop --fits-only to see why" in out


def test_one_layout(capsys):
    assert main(["--model", "llama3-70b", "--gpus", "32", "--tp", "8", "--pp", "4"]) == 0
    out = capsys.readouterr().out
    assert "first stage" in out and "last stage" in out and "TP8 PP4 DP1: fits" in out
    assert main(["--model", "llama3-70b", "--gpus", "8", "--tp", "8"]) == 1
    assert "does not fit: needs" in capsys.readouterr().out
    assert main(["--model", "qwen2.5-7b", "--gpus", "6", "--tp", "3"]) == 1
    assert "TP 3 does not divide 28 heads" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt-5", "--gpus", "8"], "unknown model name"),
    (["--model", "no/such/folder", "--gpus", "8"], "no config.json"),
    (["--model", "qwen2.5-7b", "--gpus", "12", "--tp", "8"],
     "--gpus 12 is not divisible by --tp 8 x --pp 1 = 8"),
    (["--model", "qwen2.5-7b", "--gpus", "0"], "--gpus 0: must be >= 1"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--sglang-mem-fraction", "1.5"],
     "--sglang-mem-fraction 1.5"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_unsupported_config_json(tmp_path, capsys):
    bad = _hf_config(PRESETS["qwen2.5-7b"], "GPT2LMHeadModel")
    (tmp_path / "config.json").write_text(json.dumps(bad))
    assert main(["--model", str(tmp_path), "--gpus", "8"]) == 2
    assert "not supported" in capsys.readouterr().err
    missing = {k: v for k, v in _hf_config(PRESETS["qwen2.5-7b"], "Qwen2ForCausalLM").items()
               if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(missing))
    assert main(["--model", str(tmp_path), "--gpus", "8"]) == 2
    assert "no field 'hidden_size'" in capsys.readouterr().err


def test_script_runs_without_torch_and_usage_errors_are_one_line():
    code = ("import runpy, sys; sys.argv = ['plan_parallelism.py', '--model', 'qwen2.5-7b', "
            "'--gpus', '8', '--recompute', 'some']; "
            "runpy.run_path('tools/plan_parallelism.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--recompute: invalid choice" in result.stderr
    check = run_python("import sys, megatron_paced.planner, tools.plan_parallelism; "
                       "assert 'torch' not in sys.modules", timeout=60)
    assert check.returncode == 0, check.stderr
    ok = subprocess.run([sys.executable, "tools/plan_parallelism.py", "--model", "qwen2.5-7b",
                         "--gpus", "8", "--tp", "2"], capture_output=True, text=True, cwd=REPO,
                        timeout=60, check=False)
    assert ok.returncode == 0 and "TP2 PP1 DP4: fits" in ok.stdout, ok.stderr
