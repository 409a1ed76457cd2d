"""Per-prompt tensors sharded over data-parallel ranks by prompt row: the partition, the
routing of requests to the rows' owners, the gather, and the checkpoint layout that every
per-prompt table shares (the log-Z table, the learned log Z, the Beta posterior).

Rows ``0 <= row < num_prompts`` are split in contiguous blocks
(:class:`~megatron_paced.paced.partition.PromptPartition`); rank r owns ``[row_start,
row_end)``. A request about any rows, made on any DP rank, goes to the owners and back in two
all-to-alls (one for the counts, one for the rows); values travel the same route::

    route = shard.route(rows)                    # rows asked here -> route.recv_rows owned here
    recv = shard.to_owners(route, values)        # (n, ...) per asked row -> (m, ...) per owned
    back = shard.to_askers(route, answers)       # (m,) per owned row -> (n,) per asked row

A checkpoint stores each tensor as this rank's block of a global (num_prompts, ...) tensor, so
it loads on any DP size.

Usage::

    shard = ShardedRows(num_prompts=7473, dp_group=ctx.dp_group)
    values = torch.zeros(shard.num_local, dtype=torch.float64)     # this rank's rows
    shard.lookup(rows, lambda local: values[local])                # (n,) from their owners
    shard.gather(values)                                           # (num_prompts,) everywhere
    shard.sharded_state_dict({"values": values}, prefix="table.", replica_id=(0,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_paced.paced.partition import PromptPartition


def agree(group: dist.ProcessGroup | None, ok: bool) -> bool:
    """True iff ``ok`` holds on every rank of ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
               group: dist.ProcessGroup | None) -> torch.Tensor:
    """``dist.all_to_all_single`` with split sizes, a copy on a group of one."""
    if group is None or dist.get_world_size(group) == 1:
        return send.clone()
    recv = torch.empty(sum(recv_counts), dtype=send.dtype)
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv


def row_block_tensor(key: str, data: torch.Tensor, *, row_start: int, num_prompts: int,
                     replica_id):
    """A ``ShardedTensor`` of this rank's block of rows ``[row_start, row_start + len(data))``
    of a global (num_prompts, ...) tensor. Blocks may be uneven (the last one shorter), so it
    carries no ``axis_fragmentations``; it loads into any partition."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return ShardedTensor(key=key, data=data, dtype=data.dtype, local_shape=tuple(data.shape),
                         global_shape=(num_prompts, *data.shape[1:]),
                         global_offset=(row_start,) + (0,) * (data.dim() - 1),
                         axis_fragmentations=None, replica_id=replica_id)


@dataclass
class Route:
    """Requests about ``rows`` sorted by owner, and what this rank received as an owner."""

    order: torch.Tensor
    """Permutation of the asked rows that sorts them by owner."""
    send_counts: list[int]
    recv_counts: list[int]
    recv_rows: torch.Tensor
    """Global rows this rank owns that were asked about (by any rank), in arrival order."""


class ShardedRows:
    """This DP rank's block of a per-prompt table: routing, gather and checkpoint layout."""

    def __init__(self, num_prompts: int, dp_group: dist.ProcessGroup | None) -> None:
        self.num_prompts = num_prompts
        self.dp_group = dp_group
        self.partition = PromptPartition.of(num_prompts, dp_group)
        self.dp_size, self.dp_rank = self.partition.dp_size, self.partition.dp_rank
        self.row_start, self.row_end = self.partition.row_start, self.partition.row_end

    @property
    def num_local(self) -> int:
        return self.row_end - self.row_start

    def check(self, rows: torch.Tensor) -> None:
        """Raise on every rank if any rank's ``rows`` fall outside the table."""
        ok = bool(((rows >= 0) & (rows < self.num_prompts)).all())
        if not agree(self.dp_group, ok):
            if not ok:
                bad = rows[(rows < 0) | (rows >= self.num_prompts)]
                raise ValueError(f"log-Z row {int(bad[0])} is outside the table of "
                                 f"{self.num_prompts} prompts (rows 0..{self.num_prompts - 1})")
            raise ValueError("a log-Z row on another data-parallel rank is outside the table "
                             "(see that rank's error)")

    def route(self, rows: torch.Tensor) -> Route:
        """Sort ``rows`` by owner and exchange them (collective over DP)."""
        owners = self.partition.owner_of(rows)
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.dp_size)
        recv_counts = all_to_all(send_counts, [1] * self.dp_size, [1] * self.dp_size,
                                 self.dp_group)
        send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()
        recv_rows = all_to_all(rows[order], send_counts, recv_counts, self.dp_group)
        return Route(order, send_counts, recv_counts, recv_rows)

    def to_owners(self, route: Route, values: torch.Tensor) -> torch.Tensor:
        """(n, ...) values, one per asked row, to the rows' owners: (m, ...) per received row."""
        width = math.prod(values.shape[1:])
        sent = values[route.order].reshape(-1)
        recv = all_to_all(sent, [width * c for c in route.send_counts],
                          [width * c for c in route.recv_counts], self.dp_group)
        return recv.view(-1, *values.shape[1:])

    def to_askers(self, route: Route, answers: torch.Tensor) -> torch.Tensor:
        """(m,) answers, one per received row, back to the asking ranks, in the asked order."""
        replies = all_to_all(answers, route.recv_counts, route.send_counts, self.dp_group)
        out = torch.empty(len(replies), dtype=replies.dtype)
        out[route.order] = replies
        return out

    def lookup(self, rows: torch.Tensor,
               local_values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``local_values(local row indices)`` of each requested row, answered by its owner
        (collective over DP); ``rows`` (n,) global rows, checked first."""
        rows = rows.to(torch.int64).cpu()
        self.check(rows)
        route = self.route(rows)
        return self.to_askers(route, local_values(route.recv_rows - self.row_start))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's (num_local,) block -> the (num_prompts,) float64 table on every rank."""
        full = torch.zeros(self.num_prompts, dtype=torch.float64)
        full[self.row_start:self.row_end] = local
        if self.dp_group is not None and self.dp_size > 1:
            dist.all_reduce(full, group=self.dp_group)
        return full

    def sharded_state_dict(self, tensors: dict[str, torch.Tensor], *, prefix: str,
                           replica_id) -> dict:
        """Megatron sharded state dict of this rank's blocks (``replica_id`` all zeros on
        exactly one replica of each DP rank, e.g. (tp_rank, pp_rank))."""
        return {name: row_block_tensor(f"{prefix}{name}", data, row_start=self.row_start,
                                       num_prompts=self.num_prompts, replica_id=replica_id)
                for name, data in tensors.items()}


class UpdatedRows:
    """The local rows written since the last :meth:`take` (what selection re-scores)."""

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] | None = None  # None: every row changed

    def mark(self, local_rows: torch.Tensor) -> None:
        if self._rows is not None:
            self._rows.append(local_rows)

    def mark_all(self) -> None:
        """Every row changed (a load)."""
        self._rows = None

    def take(self) -> torch.Tensor | None:
        """The rows marked since the last call (None: all of them)."""
        rows = None if self._rows is None else (
            torch.cat(self._rows) if self._rows else torch.zeros(0, dtype=torch.int64))
        self._rows = []
        return rows


def block_data(value) -> torch.Tensor:
    """A loaded block's tensor (``dist_checkpointing`` gives a tensor or a ShardedTensor)."""
    return value if isinstance(value, torch.Tensor) else value.data


def load_blocks(tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Copy the loaded blocks of :meth:`ShardedRows.sharded_state_dict` (those ``state``
    holds) into ``tensors``."""
    for name, target in tensors.items():
        if name in state:
            target.copy_(block_data(state[name]).reshape(-1))
