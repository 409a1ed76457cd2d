"""Multi-digit addition (and multiplication) with an exact verifier: a task whose difficulty
is a dial.

A problem with ``num_digits = d`` adds (or, with ``"*"`` among the operations, multiplies)
two numbers of exactly d digits (1 <= d <= 8); the prompt is ``"a+b="`` (``"a*b="``), the
answer the decimal result. Difficulty grows with d and with ``*``, so a tiny model learns the
easy levels first: the embedded default of the trainer and the benchmarks use it to get
prompts of every accuracy from 0 to 1. Each problem has a stable integer ``prompt_id`` (a
hash of its text) and is drawn from a seeded generator; :meth:`AdditionTask.sample` draws
distinct problems and can exclude a set of prompts (held-out prompts disjoint from the
training ones by construction).

Text is tokenized one character per token with :class:`CharTokenizer` (ids 0-2 are
``<pad> <bos> <eos>``), so a model for this task needs a vocabulary of 16.

Usage::

    task = AdditionTask(min_digits=1, max_digits=3)
    problems = task.sample(num_problems=64, seed=0)
    tokenizer = CharTokenizer()
    batch = task.to_batch(problems, tokenizer, seq_length=16)  # a SequenceBatch
    task.verify(problems[0], "579")                            # 1.0 or 0.0
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from megatron_paced.config import ConfigError
from megatron_paced.forward_backward import SequenceBatch
from megatron_paced.tasks.base import TaskConfig


class CharTokenizer:
    """One token per character of ``0123456789+-=*``, plus pad, bos and eos."""

    pad_id, bos_id, eos_id = 0, 1, 2
    alphabet = "0123456789+-=*"

    def __init__(self) -> None:
        self._ids = {ch: i + 3 for i, ch in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} of {text!r} is not in the alphabet "
                             f"{self.alphabet!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    num_digits: int

    @property
    def prompt_id(self) -> int:
        """A stable 63-bit id from the prompt text."""
        digest = hashlib.sha256(self.prompt.encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


OPERATIONS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}


@dataclass
class AdditionTask:
    """Two d-digit numbers, d uniform in [min_digits, max_digits], combined by an operation
    drawn uniformly from ``operations`` (``"+"``, ``"*"``)."""

    min_digits: int = 1
    max_digits: int = 3
    operations: tuple[str, ...] = ("+",)

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 8:
            raise ValueError(f"digits must satisfy 1 <= min ({self.min_digits}) <= max "
                             f"({self.max_digits}) <= 8")
        self.operations = tuple(self.operations)
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if not self.operations or unknown:
            raise ValueError(f"operations {list(self.operations)}: choose from "
                             f"{list(OPERATIONS)}")

    @property
    def max_sequence_length(self) -> int:
        """Tokens of the longest ``<bos> a+b= sum <eos>`` (3 d + 5) or ``<bos> a*b= product
        <eos>`` (4 d + 4)."""
        return max(3 * self.max_digits + 5,
                   4 * self.max_digits + 4 if "*" in self.operations else 0)

    def num_distinct(self) -> int:
        """How many different problems the task has."""
        per_level = [(10 if d == 1 else 9 * 10 ** (d - 1)) ** 2
                     for d in range(self.min_digits, self.max_digits + 1)]
        return sum(per_level) * len(self.operations)

    def sample(self, num_problems: int, seed: int,
               exclude: frozenset[str] | set[str] = frozenset()) -> list[Problem]:
        """``num_problems`` distinct problems whose prompts are not in ``exclude``, drawn from
        ``seed`` (ValueError if the task has too few)."""
        available = self.num_distinct() - len(exclude)
        if num_problems > available:
            raise ValueError(f"{num_problems} distinct problems asked, but {self.min_digits}-"
                             f"{self.max_digits} digit operands with {list(self.operations)} "
                             f"leave only {max(available, 0)}")
        rng = random.Random(seed)
        problems, seen = [], set(exclude)
        while len(problems) < num_problems:
            digits = rng.randint(self.min_digits, self.max_digits)
            low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
            a, b = rng.randint(low, high), rng.randint(low, high)
            op = self.operations[0] if len(self.operations) == 1 else rng.choice(
                self.operations)
            prompt = f"{a}{op}{b}="
            if prompt not in seen:
                seen.add(prompt)
                problems.append(Problem(prompt, str(OPERATIONS[op](a, b)), digits))
        return problems

    @staticmethod
    def verify(problem: Problem, completion: str) -> float:
        """1.0 if the completion is exactly the sum (surrounding spaces ignored), else 0.0."""
        return float(completion.strip() == problem.answer)

    @staticmethod
    def to_batch(problems: list[Problem], tokenizer: CharTokenizer, seq_length: int,
                 completions: list[str] | None = None) -> SequenceBatch:
        """``<bos> prompt completion <eos>`` right-padded; the mask covers completion + eos.

        Completions default to the reference answers (supervised data).
        """
        completions = completions if completions is not None else [p.answer for p in problems]
        tokens = torch.full((len(problems), seq_length), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(problems), seq_length)
        for row, (problem, completion) in enumerate(zip(problems, completions)):
            prompt_ids = [tokenizer.bos_id, *tokenizer.encode(problem.prompt)]
            answer_ids = [*tokenizer.encode(completion), tokenizer.eos_id]
            ids = prompt_ids + answer_ids
            if len(ids) > seq_length:
                raise ValueError(f"{problem.prompt}{completion} needs {len(ids)} tokens; "
                                 f"seq_length is {seq_length}")
            tokens[row, : len(ids)] = torch.tensor(ids)
            mask[row, len(prompt_ids): len(ids)] = 1.0
        return SequenceBatch(tokens, mask)


class ArithmeticTask:
    """The built-in addition task (character tokenizer, exact reward)."""

    def __init__(self, cfg: TaskConfig, *, seed: int, eval_num_prompts: int) -> None:
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
        """(P, G) exact-match rewards of the tokens before the first end token: 1 only for the
        answer's own tokens (a pad or bos token among them scores 0), so the reward is what
        the oracle measures, ``exp(S(answer <eos>))``."""
        return torch.tensor([[self.reward_of(p, c.token_ids) for c in row]
                             for p, row in zip(problems, completions)])

    def reward_of(self, problem, token_ids: list[int]) -> float:
        eos = self.tokenizer.eos_id
        body = token_ids[:token_ids.index(eos)] if eos in token_ids else token_ids
        if any(t < 3 for t in body):  # pad or bos inside the answer
            return 0.0
        return self.task.verify(problem, self.tokenizer.decode(body))

    def supervised_batch(self, num: int, seed: int, seq_length: int):
        """Reference answers of ``num`` problems drawn from all but the held-out prompts."""
        return self.task.to_batch(self.task.sample(num, seed=seed, exclude=self.heldout_prompts),
                                  self.tokenizer, seq_length)

    def close(self) -> None:
        pass
