"""Generate with ``transformers`` from a Hugging Face folder (an export of a training run, or
any HF model) and say where generation stopped: at the model's end token, or at the limit.

Greedy decoding of one prompt, through the tokenizer's chat template when it has one;
prints the completion, then ``stopped at the end token <name> (id N) after T tokens`` or
``hit --max-new-tokens T without an end token``. Exit status 0 either way (1 with
``--require-eos`` when no end token came), so it serves as the export's smoke test.

Usage::

    python tools/hf_generate.py --model hf/smollm2-rl --prompt "What is 12 + 30?"
"""

from __future__ import annotations

import sys

from megatron_paced.config import FlagParser, description


def generate(model_dir: str, prompt: str, max_new_tokens: int) -> tuple[str, list[int], int]:
    """(completion text, its token ids, the config's end token id) for ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise SystemExit(f"hf_generate: {model_dir}: the model names no eos_token_id (its "
                         f"config.json and generation_config.json): generation cannot stop")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens,
                             pad_token_id=model.generation_config.pad_token_id or eos)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new, eos


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--require-eos", action="store_true",
                        help="exit 1 unless generation stopped at the end token")
    args = parser.parse_args(argv)
    text, ids, eos = generate(args.model, args.prompt, args.max_new_tokens)
    print(text)
    if ids and ids[-1] == eos:
        print(f"stopped at the end token (id {eos}) after {len(ids)} tokens")
        return 0
    print(f"hit --max-new-tokens {args.max_new_tokens} without an end token (id {eos})")
    return 1 if args.require_eos else 0


if __name__ == "__main__":
    sys.exit(main())
