"""Convert a megatron-paced checkpoint (the latest iteration of ``--load``; model-only or a
training checkpoint, any TP/PP/DP it was written on) to a Hugging Face folder: safetensors
shards, ``config.json`` and the tokenizer files, loadable by ``transformers`` and SGLang.

One process; layers are streamed one at a time::

    python tools/convert_megatron_to_hf.py --load runs/qwen7b --save hf/qwen7b-step200
    python tools/convert_megatron_to_hf.py --load runs/demo --save hf/demo --tokenizer tok/

The config and tokenizer come from ``<load>/hf/`` (kept there by convert_hf_to_megatron);
for a training run's folder, from the model the run started from and the run's
``--tokenizer`` (both read from its ``config.yaml``); ``--tokenizer`` overrides. Where no HF
config exists it is generated from the checkpoint's model config, and the tokenizer's
``bos``/``eos``/``pad`` token ids are written into it, so ``generate()`` stops at the end token.
"""

from __future__ import annotations

import math
import sys

from megatron_paced.config import FlagParser, description


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--load", required=True, help="megatron-paced checkpoint folder")
    parser.add_argument("--save", required=True, help="output folder (must not exist)")
    parser.add_argument("--tokenizer", help="tokenizer folder to copy (default: <load>/hf, or the run's --tokenizer)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--quiet", action="store_true", help="no per-layer progress")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        parser.error(f"--max-shard-gb {args.max_shard_gb} must be a positive number")
    from megatron_paced.compat import enable_cpu_compat
    from megatron_paced.config import ConfigError
    from megatron_paced.convert import convert_megatron_to_hf

    enable_cpu_compat()
    try:
        cfg = convert_megatron_to_hf(args.load, args.save, tokenizer=args.tokenizer,
                                     max_shard_gb=args.max_shard_gb, progress=not args.quiet)
    except ConfigError as err:
        print(f"convert_megatron_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.save} ({cfg.architecture}, {cfg.num_layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
