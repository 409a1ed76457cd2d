"""Worker of tests/test_convert.py (one launch for all models and layouts of a world size).

For each HF folder given: the ``transformers`` forward is the reference; the folder is
converted HF -> Megatron on each ``--layouts`` (default TP1, TP2, TP2xPP2), and each checkpoint
is loaded on another layout (vocabulary re-padded, layers resharded); the
Megatron logits must equal the reference to 1e-4 relative (``logits[...]`` checks; the
errors go to ``errors.json``). Then, in one process, each last-layout checkpoint is converted
back to HF and must equal the original tensors bitwise and load in ``transformers``
(``roundtrip[...]`` checks, in ``roundtrip.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_paced.config import ParallelConfig
from megatron_paced.testing.distributed import CheckRecorder

TOLERANCE = 1e-4


def hf_reference(hf_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits.float()


def megatron_logits(ckpt: str, cfg, layout, input_ids: torch.Tensor) -> torch.Tensor:
    from megatron_paced.checkpointing import iteration_dir, latest_step, load_model_weights
    from megatron_paced.forward_backward import SequenceBatch, compute_logits
    from megatron_paced.models.gpt import build_gpt_model
    from megatron_paced.parallel import destroy_parallel, initialize_parallel

    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=layout[0],
                                             pipeline_model_parallel_size=layout[1]), seed=0)
    try:
        model = build_gpt_model(cfg, ctx, seed=0, initialize=False)
        load_model_weights(iteration_dir(ckpt, latest_step(ckpt)), model, cfg, ctx)
        batch = SequenceBatch(input_ids, torch.ones(input_ids.shape))
        return compute_logits([model], batch, ctx, vocab_size=cfg.vocab_size,
                              micro_batch_size=input_ids.shape[0]).cpu()
    finally:
        destroy_parallel()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dirs", nargs="+", required=True)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "2x2"],
                        help="TPxPP layouts to convert on; each checkpoint is loaded on the "
                        "previous one (cyclically), the last is converted back to HF")
    parser.add_argument("--roundtrip-only", nargs="*", default=[],
                        help="folders converted on TP2xPP2 for the round trip only")
    args = parser.parse_args()
    layouts = [tuple(int(x) for x in text.split("x")) for text in args.layouts]
    from megatron_paced.compat import enable_cpu_compat
    from megatron_paced.convert import convert_hf_to_megatron

    enable_cpu_compat()
    out = Path(args.out)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checks, errors = CheckRecorder(), {}
    for hf_dir in args.hf_dirs:
        name = Path(hf_dir).name
        generator = torch.Generator().manual_seed(0)
        with open(os.path.join(hf_dir, "config.json")) as f:
            vocab_size = json.load(f)["vocab_size"]
        input_ids = torch.randint(0, vocab_size, (2, 12), generator=generator)
        reference = hf_reference(hf_dir, input_ids)
        for index, layout in enumerate(layouts):
            ckpt = str(out / f"{name}-tp{layout[0]}pp{layout[1]}")
            cfg = convert_hf_to_megatron(hf_dir, ckpt, ParallelConfig(
                tensor_model_parallel_size=layout[0], pipeline_model_parallel_size=layout[1]),
                progress=False)
            # Loaded on another layout: conversion and resharding in one check.
            load_layout = layouts[index - 1]
            label = (f"{name}:convert tp{layout[0]}pp{layout[1]} "
                     f"load tp{load_layout[0]}pp{load_layout[1]}")
            with checks.check(f"logits[{label}]"):
                error = relative_error(megatron_logits(ckpt, cfg, load_layout, input_ids),
                                       reference)
                errors[label] = error
                assert error <= TOLERANCE, f"relative error {error:.2e} > {TOLERANCE}"
    last = layouts[-1]
    for hf_dir in args.roundtrip_only:
        convert_hf_to_megatron(hf_dir, str(out / f"{Path(hf_dir).name}-tp{last[0]}pp{last[1]}"),
                               ParallelConfig(tensor_model_parallel_size=last[0],
                                              pipeline_model_parallel_size=last[1]),
                               progress=False)
    checks.write(out / "checks.json")
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        roundtrip(args.hf_dirs + args.roundtrip_only, out, f"tp{last[0]}pp{last[1]}")
        (out / "errors.json").write_text(json.dumps(errors, indent=1))


def roundtrip(hf_dirs: list[str], out: Path, layout: str) -> None:
    from transformers import AutoConfig

    from megatron_paced.convert import convert_megatron_to_hf
    from megatron_paced.testing.hf_models import read_hf_tensors

    checks = CheckRecorder()
    for hf_dir in hf_dirs:
        name = Path(hf_dir).name
        with checks.check(f"roundtrip[{name}]"):
            back = str(out / f"{name}-back")
            convert_megatron_to_hf(str(out / f"{name}-{layout}"), back, progress=False)
            original, converted = read_hf_tensors(hf_dir), read_hf_tensors(back)
            assert sorted(converted) == sorted(original), \
                sorted(set(converted) ^ set(original))
            different = [k for k in original if not torch.equal(original[k], converted[k])
                         or original[k].dtype != converted[k].dtype]
            assert not different, f"not bitwise equal: {different[:4]}"
            assert AutoConfig.from_pretrained(back).to_dict()["vocab_size"] == \
                AutoConfig.from_pretrained(hf_dir).to_dict()["vocab_size"]
    checks.write(out / "roundtrip.json")


if __name__ == "__main__":
    main()
