"""What a task is (:class:`Task`, the interface the trainer uses), its flags
(:class:`TaskConfig`), and the check that a task fits the model.

Usage::

    task: Task = build_task(TaskConfig(), DataConfig(), seed=0, eval_num_prompts=64)
    check_task_fits_model(task, model_cfg, max_new_tokens=8, tokenizer_flag="--tokenizer")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol

import torch

from megatron_paced.config import ConfigError, require


class Task(Protocol):
    """Prompts and their reward: everything the trainer needs about them, nothing about the
    model. Implemented by :class:`~megatron_paced.tasks.arithmetic.ArithmeticTask` and
    :class:`~megatron_paced.tasks.dataset.DatasetTask`."""

    problems: list
    """The training prompts, each with a stable integer ``prompt_id``; row i is the log-Z
    table's row i."""
    eval_problems: list
    """Held-out prompts (never trained on, nor seen by the warm start)."""
    vocab_size: int
    """The tokenizer's vocabulary (must fit the model's)."""
    stop_token_ids: list[int]
    """Tokens that end a completion."""
    max_prompt_tokens: int
    """The longest prompt, so --max-position-embeddings is checked before any work."""

    def prompt_tokens(self, problem) -> list[int]:
        """The token ids the policy continues."""

    def score(self, problems, completions) -> torch.Tensor:
        """(P, G) rewards in [0, 1] of G completions of each of P problems."""

    def supervised_batch(self, num: int, seed: int, seq_length: int):
        """Reference answers for the SFT warm start (a SequenceBatch), or ConfigError."""

    def close(self) -> None:
        """Release what the task holds (reward worker processes)."""


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
    chat_template: bool = True
    """Feed each prompt as one user turn of the tokenizer's chat template (--no-chat-template:
    as plain text)."""
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
