"""Convert a Hugging Face checkpoint (Llama / Qwen2 / Qwen3, safetensors) to a Megatron
``dist_checkpointing`` checkpoint that ``paced-train --load`` reads on any TP/PP layout.

Run with one process per TP x PP rank; layers are streamed one at a time::

    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B \\
        --save ckpt/qwen2.5-7b --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python tools/convert_hf_to_megatron.py --hf-dir SmolLM2-135M --save ckpt/smollm2  # TP1 PP1

Bad input (unsupported architecture, a missing shard or tensor, a TP size that does not
divide the heads, mixed dtypes) is reported before anything is written; output appears at
``--save`` only once complete (it is staged in ``<save>.incomplete``).
"""

from __future__ import annotations

import os
import sys

from megatron_paced.config import FlagParser, description


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--save", required=True, help="output folder (must not exist)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no per-layer progress")
    args = parser.parse_args(argv)
    from megatron_paced.config import ConfigError, ParallelConfig
    from megatron_paced.convert import convert_hf_to_megatron

    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    try:
        cfg = convert_hf_to_megatron(args.hf_dir, args.save, parallel, progress=not args.quiet)
    except ConfigError as err:
        print(f"convert_hf_to_megatron: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {args.save} ({cfg.architecture}, {cfg.num_layers} layers, TP "
              f"{args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size}); "
              f"use it with paced-train --load {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
