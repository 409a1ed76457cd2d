"""Shared test helpers. Tests that import Megatron-Core and switch the CPU compatibility
layer on run in a subprocess, so the pytest process itself keeps a pristine torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def run_python(code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a Python snippet (or ``-m module`` when ``code`` starts with ``-m ``) in a child."""
    command = [sys.executable]
    command += code.split() if code.startswith("-m ") else ["-c", textwrap.dedent(code)]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_WORDS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant",
              "system", "what", "is", "+", "?", "be", "brief", "\n", " ", *"0123456789"]


def chat_tokenizer(folder) -> tuple[str, dict[str, int]]:
    """A word-level Hugging Face tokenizer with a ChatML template, saved to ``folder`` offline;
    returns the folder and the word ids."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    ids = {w: i for i, w in enumerate(CHAT_WORDS)}
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| "), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return str(folder), ids
