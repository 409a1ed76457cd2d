"""The task of ``--task`` (see :mod:`megatron_paced.tasks`)."""

from __future__ import annotations

from megatron_paced.config import ConfigError
from megatron_paced.data import DataConfig, DataError
from megatron_paced.tasks.arithmetic import ArithmeticTask
from megatron_paced.tasks.base import Task, TaskConfig
from megatron_paced.tasks.dataset import DatasetTask


def build_task(cfg: TaskConfig, data: DataConfig, *, seed: int, eval_num_prompts: int) -> Task:
    """The task of ``--task``; dataset problems raise ConfigError naming the file line."""
    if cfg.task == "arithmetic":
        return ArithmeticTask(cfg, seed=seed, eval_num_prompts=eval_num_prompts)
    try:
        return DatasetTask(cfg, data, eval_num_prompts=eval_num_prompts)
    except (DataError, ValueError, OSError) as err:
        raise ConfigError(str(err)) from None
