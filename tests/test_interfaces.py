"""The four extension points as named interfaces: every implementation declares each member of
its Protocol (a member added to a Protocol is then demanded of every implementation), every
loss keeps Megatron's loss contract as the optimization stage reads it, and the worked
examples of docs/architecture.md name tests that exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from megatron_paced.paced.estimator import AccuracyEstimator
from megatron_paced.paced.estimators import BetaPosteriorTable, OracleAccuracy
from megatron_paced.paced.learned_log_z import LearnedLogZ
from megatron_paced.paced.log_z import ShardedLogZ
from megatron_paced.rl.batch import RLBatch
from megatron_paced.rollout.async_rollout import AsyncSGLangBackend
from megatron_paced.rollout.backend import RolloutBackend
from megatron_paced.rollout.engine import EmbeddedEngine
from megatron_paced.rollout.sglang_backend import SGLangBackend
from megatron_paced.tasks.arithmetic import ArithmeticTask
from megatron_paced.tasks.base import Task
from megatron_paced.tasks.dataset import DatasetTask

REPO = Path(__file__).resolve().parents[1]


def protocol_members(protocol) -> tuple[set[str], set[str]]:
    """(attributes, methods) a Protocol declares in its own body."""
    attributes = set(protocol.__dict__.get("__annotations__", {}))
    methods = {name for name, value in protocol.__dict__.items()
               if inspect.isfunction(value) and not name.startswith("_")}
    return attributes, methods


def missing_members(protocol, cls, instance_attributes=()) -> list[str]:
    """Members of ``protocol`` that ``cls`` does not define (attributes set in ``__init__``
    are named in ``instance_attributes``)."""
    attributes, methods = protocol_members(protocol)
    missing = [m for m in sorted(methods) if not callable(getattr(cls, m, None))]
    missing += [a for a in sorted(attributes)
                if not hasattr(cls, a) and a not in instance_attributes]
    return missing


@pytest.mark.parametrize("cls", [ShardedLogZ, LearnedLogZ, BetaPosteriorTable, OracleAccuracy])
def test_every_estimator_declares_the_interface(cls):
    assert missing_members(AccuracyEstimator, cls, instance_attributes=("num_prompts",)) == []
    assert isinstance(cls.scores_change_every_step, bool) and isinstance(cls.name, str)


@pytest.mark.parametrize("cls", [EmbeddedEngine, SGLangBackend, AsyncSGLangBackend])
def test_every_rollout_backend_declares_the_interface(cls):
    assert missing_members(RolloutBackend, cls) == []
    assert isinstance(cls.asked_once_per_replica, bool)


@pytest.mark.parametrize("cls", [ArithmeticTask, DatasetTask])
def test_every_task_declares_the_interface(cls):
    source = inspect.getsource(cls)
    missing = missing_members(Task, cls, instance_attributes=[
        a for a in protocol_members(Task)[0] if f"self.{a}" in source])
    assert missing == []


def test_a_built_task_is_a_task():
    from megatron_paced.data import DataConfig
    from megatron_paced.tasks import TaskConfig, build_task

    task = build_task(TaskConfig(task_num_prompts=8), DataConfig(), seed=0, eval_num_prompts=4)
    attributes, _ = protocol_members(Task)
    assert all(hasattr(task, a) for a in attributes)
    assert all(hasattr(p, "prompt_id") for p in task.problems + task.eval_problems)
    task.close()


@pytest.mark.parametrize("algo", ["paced", "flowrl", "grpo"])
def test_every_loss_keeps_megatrons_contract(algo):
    """(loss_sum, num_items, logs): a scalar with a gradient, an int count, and the logs the
    optimization stage sums (``loss_sum`` and ``num_sequences`` or ``num_tokens``)."""
    from megatron_paced.job import AlgorithmConfig
    from megatron_paced.rl.optimize import loss_fn_for

    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    token_log_probs = (-torch.rand(3, 4, generator=gen) * mask).requires_grad_(True)
    log_z = torch.zeros(3, requires_grad=True)
    batch = RLBatch(torch.zeros(3, 4, dtype=torch.long), mask, log_z_rows=torch.arange(3),
                    updates_log_z=torch.ones(3, dtype=torch.bool),
                    rewards=torch.tensor([1.0, 0.0, 1.0]),
                    advantages=torch.tensor([0.7, -1.4, 0.7]),
                    old_log_probs=token_log_probs.detach() - 0.1,
                    ref_log_probs=token_log_probs.detach() - 0.2, log_z=log_z)
    loss_sum, num_items, logs = loss_fn_for(AlgorithmConfig(algo=algo))(token_log_probs, batch)
    assert loss_sum.dim() == 0 and torch.isfinite(loss_sum)
    assert num_items.dtype == torch.int and int(num_items) > 0
    count = logs.get("num_sequences", logs.get("num_tokens"))
    assert int(count) == int(num_items) and torch.equal(logs["loss_sum"], loss_sum.detach())
    loss_sum.backward()
    assert token_log_probs.grad is not None and (token_log_probs.grad * (1 - mask)).abs().sum() == 0
    if algo != "grpo":  # the TB losses train log Z
        assert log_z.grad is not None and log_z.grad.abs().sum() > 0


def test_architecture_doc_names_tests_that_exist():
    """Every ``tests/...py::test_name`` the worked examples cite is a test of that file."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    cited = re.findall(r"(tests/[\w/]+\.py)::(\w+)", doc)
    assert len(cited) >= 8, cited
    for path, name in cited:
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is not a test"
