"""Worker of tests/test_convert.py: one launch converts every model on its layouts.

For each ``--model DIR LAYOUTS`` (``LAYOUTS`` like ``1x1,2x1,2x2``: TPxPP, DP fills the world):
the ``transformers`` forward is the reference (computed on rank 0, broadcast); the folder is
converted HF -> Megatron on each layout, and each checkpoint is loaded on another layout (the
previous one, cyclically, or the one named after a colon: ``1x2:1x1`` converts on PP2 and
loads on TP1; vocabulary re-padded, layers resharded); the Megatron logits must
equal the reference to 1e-4 relative (``logits[...]`` checks; the errors go to
``errors.json``). Then, in one process, the last-layout checkpoint of each ``--roundtrip``
model is converted back to HF and must equal the original tensors bitwise and load in
``transformers`` (``roundtrip[...]`` checks, in ``roundtrip.json``); ``--roundtrip-only``
folders are converted on the last layout of the first model for the round trip only.

    torchrun --nproc-per-node 4 -m tests.distributed.convert_worker --out DIR \
        --model tiny/llama 1x1,2x1,2x2 --model SmolLM2 1x2:1x1 --roundtrip tiny/llama
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
    """The transformers logits, computed on rank 0 and broadcast (one model load, not one
    per rank)."""
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(hf_dir).vocab_size if dist.get_rank() == 0 else 0
    size = torch.tensor([vocab_size])
    dist.broadcast(size, 0)
    logits = torch.empty(*input_ids.shape, int(size))
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids).logits.float().contiguous()
    dist.broadcast(logits, 0)
    return logits


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


def parse_layouts(text: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """``TPxPP`` or ``TPxPP:TPxPP`` (convert on the first, load on the second) -> the layout
    and the load layout (None: the previous layout)."""
    convert, _, load = text.partition(":")
    return _layout(convert), _layout(load) if load else None


def _layout(text: str) -> tuple[int, int]:
    tp, pp = text.split("x")
    return int(tp), int(pp)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", nargs=2, action="append", required=True,
                        metavar=("HF_DIR", "LAYOUTS"),
                        help="a folder and the TPxPP layouts to convert it on, comma-separated; "
                        "each checkpoint is loaded on the previous layout (cyclically)")
    parser.add_argument("--roundtrip", nargs="*", default=[],
                        help="folders of --model whose last-layout checkpoint goes back to HF")
    parser.add_argument("--roundtrip-only", nargs="*", default=[],
                        help="folders converted on the first model's last layout for the round "
                        "trip only")
    args = parser.parse_args()
    models = [(hf_dir, [parse_layouts(text) for text in layouts.split(",")])
              for hf_dir, layouts in args.model]
    from megatron_paced.compat import enable_cpu_compat
    from megatron_paced.convert import convert_hf_to_megatron

    enable_cpu_compat()
    out = Path(args.out)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checks, errors, last_layout = CheckRecorder(), {}, {}
    for hf_dir, layouts in models:
        name = Path(hf_dir).name
        generator = torch.Generator().manual_seed(0)
        with open(os.path.join(hf_dir, "config.json")) as f:
            vocab_size = json.load(f)["vocab_size"]
        input_ids = torch.randint(0, vocab_size, (2, 12), generator=generator)
        reference = hf_reference(hf_dir, input_ids)
        for index, (layout, load_layout) in enumerate(layouts):
            load_layout = load_layout or layouts[index - 1][0]
            ckpt = str(out / f"{name}-tp{layout[0]}pp{layout[1]}")
            cfg = convert_hf_to_megatron(hf_dir, ckpt, ParallelConfig(
                tensor_model_parallel_size=layout[0], pipeline_model_parallel_size=layout[1]),
                progress=False)
            # Loaded on another layout: conversion and resharding in one check.
            label = (f"{name}:convert tp{layout[0]}pp{layout[1]} "
                     f"load tp{load_layout[0]}pp{load_layout[1]}")
            with checks.check(f"logits[{label}]"):
                error = relative_error(megatron_logits(ckpt, cfg, load_layout, input_ids),
                                       reference)
                errors[label] = error
                assert error <= TOLERANCE, f"relative error {error:.2e} > {TOLERANCE}"
        last_layout[hf_dir] = layouts[-1][0]
    last = models[0][1][-1][0]
    for hf_dir in args.roundtrip_only:
        convert_hf_to_megatron(hf_dir, str(out / f"{Path(hf_dir).name}-tp{last[0]}pp{last[1]}"),
                               ParallelConfig(tensor_model_parallel_size=last[0],
                                              pipeline_model_parallel_size=last[1]),
                               progress=False)
        last_layout[hf_dir] = last
    checks.write(out / "checks.json")
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        roundtrip({d: last_layout[d] for d in args.roundtrip + args.roundtrip_only}, out)
        (out / "errors.json").write_text(json.dumps(errors, indent=1))


def roundtrip(layouts: dict[str, tuple[int, int]], out: Path) -> None:
    from transformers import AutoConfig

    from megatron_paced.convert import convert_megatron_to_hf
    from megatron_paced.testing.hf_models import read_hf_tensors

    checks = CheckRecorder()
    for hf_dir, (tp, pp) in layouts.items():
        name = Path(hf_dir).name
        with checks.check(f"roundtrip[{name}]"):
            back = str(out / f"{name}-back")
            convert_megatron_to_hf(str(out / f"{name}-tp{tp}pp{pp}"), back, progress=False)
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
