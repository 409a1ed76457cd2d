"""Process groups: the one place that touches Megatron's global parallel state.

:func:`initialize_parallel` starts ``torch.distributed`` (nccl with CUDA, gloo without, the
CPU compatibility layer switched on in the latter case), builds Megatron's TP x PP x DP groups
and returns a :class:`ParallelContext` that everything else receives as an argument: models,
log-prob computation, losses and (later) the sharded log-Z table never call the global
getters themselves.

Ranks are laid out as Megatron's default order ``tp-cp-ep-dp-pp``: TP ranks are adjacent,
then DP, then PP.

Usage (under ``torchrun --nproc-per-node 4``)::

    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=2), seed=1234)
    print(ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.dp_size)
    ...
    destroy_parallel()
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_paced.compat import enable_cpu_compat
from megatron_paced.config import ParallelConfig
from megatron_paced.utils import free_port


@dataclass
class ParallelContext:
    """Process groups and this rank's coordinates in the TP x PP x DP grid."""

    pg: "object"  # megatron.core.process_groups_config.ProcessGroupCollection
    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.pg.tp

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.pg.pp

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.pg.dp

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.pg.tp)

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.pg.tp)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pg.pp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pg.pp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.pg.dp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.pg.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def last_stage_global_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline."""
        return dist.get_global_rank(self.pg.pp, self.pp_size - 1)


# Upstream warnings that carry no information for a user of this package: Megatron falling
# back to torch implementations without Apex/TE (expected on the CPU), and Megatron's own
# use of torch APIs that torch has deprecated.
_KNOWN_UPSTREAM_WARNINGS = (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r".*full scope is deprecated.*",
    r".*`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
    r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
    r".*`load_state_dict` is deprecated and will be removed in future versions.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
)


def initialize_rerun_state_machine() -> None:
    """Megatron's rerun state machine (its result validation, which the schedules consult),
    disabled as Megatron's ``--rerun-mode`` defaults to, and set up here as Megatron's
    ``training.py`` does: its schedules would otherwise set it up implicitly and say so on
    every run. Its start-up notice of the mode is not printed. A machine left by an earlier
    layout in this process is replaced (Megatron asserts on a second initialization), as
    ``initialize_model_parallel`` replaces the groups."""
    from megatron.core import rerun_state_machine as rerun

    upstream = logging.getLogger(rerun.__name__)
    level = upstream.level
    upstream.setLevel(logging.ERROR)
    try:
        rerun.destroy_rerun_state_machine()
        rerun.initialize_rerun_state_machine(mode=rerun.RerunMode.DISABLED)
    finally:
        upstream.setLevel(level)


def silence_known_upstream_warnings() -> None:
    for pattern in _KNOWN_UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def broadcast_from_last_stage(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Give every pipeline stage the last stage's values (in place; returns the tensor).

    Losses run on the last stage only, so their by-products (token log-probs, log-Z
    gradients) must be broadcast before the replicas of a DP rank can act on them alike.
    """
    if ctx.pp_size > 1:
        dist.broadcast(tensor, src=ctx.last_stage_global_rank(), group=ctx.pp_group)
    return tensor


def broadcast_objects_in_replica(obj, ctx: ParallelContext):
    """The first rank's (TP 0, PP 0) picklable ``obj`` on every rank of its model replica:
    over TP among the first stage, then over PP."""
    box = [obj]
    if ctx.tp_size > 1 and ctx.pp_rank == 0:
        dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.tp_group, 0),
                                   group=ctx.tp_group)
    if ctx.pp_size > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.pp_group, 0),
                                   group=ctx.pp_group)
    return box[0]


def _backend(config: ParallelConfig, cuda: bool | None = None) -> str:
    """The process groups' backend. With NCCL, CPU tensors go over gloo in the same groups
    (``cpu:gloo,cuda:nccl``): the PACED bookkeeping (log-Z table, selection, replay, metrics)
    lives on the host, and NCCL has no CPU path."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if config.distributed_backend == "gloo" or not cuda:
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def initialize_parallel(
    config: ParallelConfig, *, seed: int, timeout_minutes: int = 30
) -> ParallelContext:
    """Start torch.distributed (if needed) and Megatron's model-parallel groups.

    Reads the usual torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); a plain ``python`` run is world size 1. The layout is
    validated against the world size before any group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(world_size=world_size)
    silence_known_upstream_warnings()
    if not torch.cuda.is_available():
        enable_cpu_compat()
        # A CUDA tuning hint (launch scripts set the variable on GPUs); meaningless here.
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # A world of one meets nobody: a free port, so that two plain `python` runs on
            # one machine (a converter beside a trainer) do not both claim 29500.
            os.environ["MASTER_PORT"] = "29500" if world_size > 1 else str(free_port())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=_backend(config),
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    initialize_rerun_state_machine()
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    return ParallelContext(
        pg=ProcessGroupCollection.use_mpu_process_groups(),
        config=config,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
    )


def destroy_parallel(*, destroy_process_group: bool = False) -> None:
    """Tear down Megatron's groups (so that another layout can be built in the same process)."""
    from megatron.core import parallel_state, rerun_state_machine

    parallel_state.destroy_model_parallel()
    rerun_state_machine.destroy_rerun_state_machine()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
