"""Tokenizers for prompts: Hugging Face tokenizers with their chat templates, offline.

``encode_prompt(text)`` is what the rollout feeds the model: with a chat template (and
``chat_template=True``) the prompt becomes one user turn and the template's generation
prompt is appended; otherwise the plain encoding (with BOS where the tokenizer adds one).
``stop_token_ids`` are the ids that end a completion (EOS, and the template's end-of-turn
token when it has one). Files are read from a local folder only (no hub access).

Usage::

    tokenizer = HFTokenizer("checkpoints/Qwen2.5-Math-1.5B", system_prompt=None)
    ids = tokenizer.encode_prompt("What is 2 + 3?")
    text = tokenizer.decode(completion_ids)
"""

from __future__ import annotations

import os


class HFTokenizer:
    """A ``transformers`` tokenizer loaded from a local folder."""

    def __init__(self, path: str, *, chat_template: bool = True,
                 system_prompt: str | None = None) -> None:
        if not os.path.isdir(path):
            raise ValueError(f"--tokenizer {path!r} is not a folder")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.use_chat_template = chat_template and bool(self.tokenizer.chat_template)
        self.system_prompt = system_prompt

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return sorted(i for i in ids if i is not None)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not self.use_chat_template:
            return list(self.tokenizer(prompt)["input_ids"])
        messages = ([{"role": "system", "content": self.system_prompt}]
                    if self.system_prompt else []) + [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
