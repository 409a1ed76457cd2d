"""The addition task: generator, verifier, tokenizer and batch layout."""

from __future__ import annotations

import pytest

from megatron_paced.tasks.arithmetic import AdditionTask, CharTokenizer


def test_problems_are_seeded_correct_and_sized():
    task = AdditionTask(min_digits=2, max_digits=4)
    problems = task.sample(200, seed=3)
    assert problems == task.sample(200, seed=3) and problems != task.sample(200, seed=4)
    for p in problems:
        a, b = p.prompt[:-1].split("+")
        assert len(a) == len(b) == p.num_digits and int(a) + int(b) == int(p.answer)
        assert task.verify(p, p.answer) == 1.0 and task.verify(p, p.answer + "1") == 0.0
    assert {p.num_digits for p in problems} == {2, 3, 4}
    assert len({p.prompt_id for p in problems}) == len({p.prompt for p in problems})


def test_batch_layout():
    tokenizer = CharTokenizer()
    task = AdditionTask(1, 3)
    problems = task.sample(8, seed=0)
    batch = task.to_batch(problems, tokenizer, task.max_sequence_length)
    for row, p in enumerate(problems):
        ids = batch.tokens[row].tolist()
        start = 1 + len(p.prompt)
        assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids[1:start]) == p.prompt
        mask = batch.completion_mask[row]
        assert mask[:start].sum() == 0 and mask.sum() == len(p.answer) + 1
        assert tokenizer.decode(ids[start:start + len(p.answer)]) == p.answer
        assert ids[start + len(p.answer)] == tokenizer.eos_id
    with pytest.raises(ValueError, match="seq_length"):
        task.to_batch(problems, tokenizer, seq_length=5)
    with pytest.raises(ValueError, match="not in the alphabet"):
        tokenizer.encode("1/2")
