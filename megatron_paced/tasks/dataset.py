"""Math datasets (GSM8K, MATH-500) and prompt files with a Hugging Face tokenizer and a
verifier, as a :class:`~megatron_paced.tasks.base.Task`.

Usage::

    task = DatasetTask(TaskConfig(task="gsm8k", tokenizer="ckpt/hf"), DataConfig(),
                       eval_num_prompts=64)
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_paced.config import ConfigError, require
from megatron_paced.data import DataConfig, DataError, PromptDataset
from megatron_paced.tasks.base import TaskConfig


class DatasetTask:
    """Prompt files (or GSM8K / MATH-500) with a Hugging Face tokenizer and a reward."""

    def __init__(self, cfg: TaskConfig, data: DataConfig, *, eval_num_prompts: int) -> None:
        from megatron_paced import data as data_lib
        from megatron_paced.rewards import get_reward
        from megatron_paced.tokenizer import HFTokenizer

        self.tokenizer = HFTokenizer(cfg.tokenizer, chat_template=cfg.chat_template,
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
