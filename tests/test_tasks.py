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


def test_problems_are_distinct_products_fit_and_held_out_prompts_are_disjoint():
    from megatron_paced.config import ConfigError
    from megatron_paced.data import DataConfig
    from megatron_paced.tasks import TaskConfig, build_task

    task = AdditionTask(1, 2, ("+", "*"))
    problems = task.sample(400, seed=1)
    assert len({p.prompt for p in problems}) == 400
    assert {p.prompt[1 if p.num_digits == 1 else 2] for p in problems} == {"+", "*"}
    for p in problems:
        a, op, b = p.prompt[:p.num_digits], p.prompt[p.num_digits], p.prompt[p.num_digits + 1:-1]
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    # <bos> 99*99=9801 <eos>: 4 d + 4 = 12 tokens, more than a sum's 3 d + 5 = 11
    assert task.max_sequence_length == len(CharTokenizer().encode("99*99=9801")) + 2 == 12
    assert task.num_distinct() == 2 * (100 + 8100)
    with pytest.raises(ValueError, match="leave only 100"):
        AdditionTask(1, 1).sample(101, seed=0)
    excluded = {p.prompt for p in AdditionTask(1, 1).sample(90, seed=0)}
    rest = AdditionTask(1, 1).sample(10, seed=5, exclude=excluded)
    assert not excluded & {p.prompt for p in rest}

    # The trainer's arithmetic task: held-out prompts never in training nor in the SFT data.
    built = build_task(TaskConfig(task_num_prompts=300, task_max_digits=2), DataConfig(),
                       seed=0, eval_num_prompts=128)
    train = {p.prompt for p in built.problems}
    held_out = {p.prompt for p in built.eval_problems}
    assert len(train) == 300 and len(held_out) == 128 and not train & held_out
    sft = built.supervised_batch(2000, seed=3, seq_length=16)
    sft_prompts = {CharTokenizer().decode(row[1:row.tolist().index(CharTokenizer().eos_id)])
                   .split("=")[0] + "=" for row in sft.tokens}
    assert len(sft_prompts) == 2000 and not sft_prompts & held_out
    with pytest.raises(ConfigError, match="--task-num-prompts 90 \\+ --eval-num-prompts 20"):
        build_task(TaskConfig(task_num_prompts=90, task_max_digits=1), DataConfig(), seed=0,
                   eval_num_prompts=20)


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


def test_dataset_task_tokenizes_with_chat_template_and_scores(tmp_path):
    import json

    from megatron_paced.data import DataConfig
    from megatron_paced.rollout.engine import Completion
    from megatron_paced.tasks import TaskConfig, build_task
    from tests.conftest import chat_tokenizer

    tokenizer, ids = chat_tokenizer(tmp_path / "tok")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} + 0 ?", "answer": str(a)})
                            + "\n" for a in range(10)))
    task = build_task(TaskConfig(task="prompts", tokenizer=tokenizer, reward="exact"),
                      DataConfig(prompt_data=str(data)), seed=0, eval_num_prompts=10)
    try:
        # Every fifth prompt (by prompt id order) is held out; the rest are rows 0..7.
        assert len(task.problems) == 8 and len(task.eval_problems) == 2
        assert [p.index for p in task.problems] == list(range(8))
        assert not {p.prompt_id for p in task.problems} & {p.prompt_id for p in task.eval_problems}
        problem = task.problems[0]
        tokens = [t for t in task.prompt_tokens(problem) if t != ids[" "]]
        assert tokens[:2] == [ids["<|im_start|>"], ids["user"]] and tokens[-1] == ids["\n"]
        right = Completion(0, 0, [ids[problem.answer], ids["<|im_end|>"]], [0.0, 0.0], "stop")
        wrong = Completion(0, 1, [ids["what"]], [0.0], "length")
        assert task.score([problem], [[right, wrong, right]]).tolist() == [[1.0, 0.0, 1.0]]
        assert task.stop_token_ids == sorted({ids["<|endoftext|>"], ids["<|im_end|>"]})
    finally:
        task.close()


def test_verifier_and_oracle_count_the_same_completions():
    """A reward of 1 is exactly the completion the oracle scores, ``answer <eos>`` (or the
    answer alone when it fills --max-new-tokens): a pad or bos token inside scores 0."""
    from types import SimpleNamespace

    from megatron_paced.data import DataConfig
    from megatron_paced.paced.estimators import OracleAccuracy
    from megatron_paced.tasks import TaskConfig, build_task

    task = build_task(TaskConfig(task_num_prompts=8), DataConfig(), seed=0, eval_num_prompts=4)
    tok, problem = task.tokenizer, task.problems[0]
    answer = tok.encode(problem.answer)
    pad, bos, eos = tok.pad_id, tok.bos_id, tok.eos_id
    cases = {"answer eos": (answer + [eos], 1.0), "answer alone (length)": (answer, 1.0),
             "pad first": ([pad] + answer + [eos], 0.0),
             "bos before eos": (answer + [bos, eos], 0.0),
             "pad inside": (answer[:1] + [pad] + answer[1:] + [eos], 0.0),
             "wrong": (answer + answer + [eos], 0.0)}
    got = {name: float(task.score([problem], [[SimpleNamespace(token_ids=ids)]])[0, 0])
           for name, (ids, _) in cases.items()}
    assert got == {name: reward for name, (_, reward) in cases.items()}
    for max_new_tokens, target in ((len(answer) + 1, answer + [eos]), (len(answer), answer)):
        oracle = OracleAccuracy(task, policy=None, ctx=None, max_new_tokens=max_new_tokens)
        batch = oracle._answer_batch([problem])
        scored = batch.tokens[0][batch.completion_mask[0] > 0].tolist()
        assert scored == target  # what the oracle's exp(S) is over: the rewarded completion
        assert float(task.score([problem], [[SimpleNamespace(token_ids=scored)]])[0, 0]) == 1.0
    task.close()
