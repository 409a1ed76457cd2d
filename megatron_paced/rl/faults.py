"""Fault injection and testing aids, one object the trainer calls at three points of a step
(``--inject-nan-at-step``, ``--kill-rollout-server-after-step``, ``--exit-after-step``).

* :meth:`FaultInjection.before_optimize`: the batch with one NaN reward (a copy; the run
  must stop before any update, naming the step and its prompts).
* :meth:`FaultInjection.after_step`: SIGKILL the first rollout server this process launched
  (the client must restart it and lose nothing).
* :meth:`FaultInjection.after_save`: exit with code 17 right after the step's checkpoint,
  as if the job were killed (a resumed run must equal an uninterrupted one).

Usage::

    faults = FaultInjection(job.debug)
    batch = faults.before_optimize(batch, step)
    faults.after_step(step, rollout)
    faults.after_save(step)
"""

from __future__ import annotations

import dataclasses
import os

import torch.distributed as dist

from megatron_paced.job import DebugConfig
from megatron_paced.rl.batch import RLBatch

EXIT_CODE = 17


class FaultInjection:
    """The hooks of a :class:`~megatron_paced.job.DebugConfig` (each a no-op unless set)."""

    def __init__(self, cfg: DebugConfig) -> None:
        self.cfg = cfg

    def before_optimize(self, batch: RLBatch, step: int) -> RLBatch:
        if self.cfg.inject_nan_at_step != step:
            return batch
        rewards = batch.rewards.clone()
        rewards[0] = float("nan")
        return dataclasses.replace(batch, rewards=rewards)

    def after_step(self, step: int, rollout) -> None:
        if self.cfg.kill_rollout_server_after_step == step:
            rollout.kill_first_server()

    def after_save(self, step: int) -> None:
        if self.cfg.exit_after_step is not None and step == self.cfg.exit_after_step:
            dist.barrier()
            os._exit(EXIT_CODE)
