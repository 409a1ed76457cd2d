"""``--weight-sync nccl``: the policy broadcast to the servers over a weight-update group, a
process group outside the trainer's world (rank 0: the stage's sender; then every server's
TP ranks), formed through SGLang's ``/init_weights_update_group``; per bucket
``/update_weights_from_distributed`` while the sender broadcasts each tensor (NCCL between
GPUs, gloo on a CPU run). One group per pipeline stage (``paced-pp<N>-<random>`` on
``master_port + N``).

Usage::

    sync = DistributedTransport(client, model_cfg, ctx, backend="nccl")
    sync.push(policy.modules()[0], version="12")
"""

from __future__ import annotations

import datetime
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist

from megatron_paced.rollout.weight_sync import PreparedPush, _Transport, iter_hf_buckets
from megatron_paced.utils import free_port


def open_update_group(backend: str, address: str, port: int, rank: int, world_size: int,
                      group_name: str, timeout_s: float = 600.0):
    """A process group outside the trainer's world for weight updates, collective over its
    members (the trainer's sender, rank 0, and the servers' ranks).

    It is built the way SGLang's ``init_custom_process_group`` builds its side -- a TCP
    store at ``address:port`` hosted by rank 0, prefixed by the group name, and torch's
    process-group helper (private API, as SGLang uses) -- so that both sides meet on the same
    store keys. The store is made directly rather than by ``rendezvous("tcp://...")``: under
    torchrun that would wait for the elastic agent's store instead of hosting one. Broadcast
    with ``dist.broadcast(t, group=g, group_src=0)``.
    """
    from torch.distributed import distributed_c10d as c10d

    if backend not in ("nccl", "gloo"):
        raise ValueError(f"weight-update group backend {backend!r}: choose nccl or gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                          multi_tenant=True)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], backend, dist.PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def close_update_group(group) -> None:
    """Leave a group made by :func:`open_update_group` (local; peers may be gone)."""
    try:
        dist.destroy_process_group(group)
    except Exception:  # noqa: BLE001 - a group whose peers died may not tear down cleanly
        pass


def _while_posting(posts: list[Callable[[], dict]], work: Callable[[], object]):
    """Run ``work`` (this side of a collective) while the HTTP calls that make the servers
    join it are in flight; a server's refusal raises at once instead of leaving ``work``
    waiting for a peer that never comes. Returns (work's result, the answers)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            result["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    with ThreadPoolExecutor(max(1, len(posts))) as pool:
        futures = [pool.submit(post) for post in posts]
        worker.start()
        answers = [future.result() for future in futures]  # raises a server's error
    failed = [a for a in answers if isinstance(a, dict) and a.get("success") is False]
    if failed:
        raise RuntimeError(f"a rollout server refused the weight update: {failed[0]}")
    worker.join()
    if "error" in result:
        raise result["error"]
    return result.get("value"), answers


class DistributedTransport(_Transport):
    """Broadcast over a weight-update group (NCCL on GPUs, gloo on CPUs)."""

    def __init__(self, client, model_cfg, ctx, *, backend: str, master_address: str | None = None,
                 master_port: int = 0, timeout_s: float = 600.0, **kwargs) -> None:
        super().__init__(client, model_cfg, ctx, **kwargs)
        self.backend = backend
        self.master_address = master_address or _reachable_address(client)
        self.master_port = master_port
        self.timeout_s = timeout_s
        self.group = None
        # The group's store (torch's TCPStore) listens on every interface without a key; a
        # random name per run keeps a stranger who finds the port from joining the group:
        # its keys live under this prefix, which only the servers learn (through their
        # authenticated /init_weights_update_group).
        self.group_name = f"paced-pp{ctx.pp_rank}-{secrets.token_hex(8)}"

    def connect(self) -> None:
        """Form the group with every server's ranks (this stage's sender only)."""
        servers = self.client.servers
        tp_sizes = self.server_tp_sizes()
        world_size = 1 + sum(tp_sizes)
        port = (self.master_port + self.ctx.pp_rank) if self.master_port else free_port("")

        def init(server, rank_offset: int) -> Callable[[], dict]:
            return lambda: self.client.post(server, "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": port,
                "rank_offset": rank_offset, "world_size": world_size,
                "group_name": self.group_name, "backend": self.backend},
                timeout_s=self.timeout_s)

        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(servers))]
        self.group, _ = _while_posting(
            [init(server, offset) for server, offset in zip(servers, offsets)],
            lambda: open_update_group(self.backend, self.master_address, port, 0, world_size,
                                      self.group_name, self.timeout_s))

    def _send(self, model, version: str) -> None:
        if self.is_sender and self.group is None:
            self.connect()
        pending = None  # one bucket behind, to mark the last one
        for bucket in iter_hf_buckets(model, self.model_cfg, self.ctx, self.bucket_bytes):
            if pending is not None and self.is_sender:
                self._send_bucket(pending, None)
            pending = bucket
        if pending is not None and self.is_sender:
            self._send_bucket(pending, version)

    def prepare(self, model, version: str) -> PreparedPush | None:
        """The whole stage, gathered and copied (the policy steps on while it waits)."""
        device = torch.device("cpu") if self.backend == "gloo" else self.ctx.device
        buckets = [[(name, tensor.to(device, copy=True)) for name, tensor in bucket]
                   for bucket in iter_hf_buckets(model, self.model_cfg, self.ctx,
                                                 self.bucket_bytes)]
        return PreparedPush(version, buckets) if self.is_sender else None

    def apply(self, prepared: PreparedPush, servers) -> None:
        """Every server of the group receives it (a broadcast reaches them all)."""
        if self.group is None:
            self.connect()
        for index, bucket in enumerate(prepared.payload):
            last = index == len(prepared.payload) - 1
            self._send_bucket(bucket, prepared.version if last else None)
        self.last_applied = prepared if self.keep_last else None

    def replay_last(self, server) -> None:
        if self.last_applied is None:
            raise RuntimeError("a rollout server restarted before any weights were pushed")
        self._leave_group()
        self.apply_in_session(self.last_applied, self.client.servers)
        self.finish(self.last_applied.version, self.client.servers)

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        device = torch.device("cpu") if self.backend == "gloo" else self.ctx.device
        tensors = [tensor.to(device) for _, tensor in bucket]
        body = {"names": [name for name, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                "shapes": [list(t.shape) for t in tensors], "group_name": self.group_name,
                "flush_cache": False, "weight_version": version}  # flushed by finish()

        def broadcast() -> None:
            for tensor in tensors:
                dist.broadcast(tensor, group=self.group, group_src=0)

        _while_posting([lambda s=s: self.client.post(s, "/update_weights_from_distributed", body,
                                                     timeout_s=self.timeout_s)
                        for s in self.client.servers], broadcast)

    def on_server_restart(self, model) -> None:
        """The restarted server lost the group: every server forms a new one."""
        if self.is_sender:
            self._leave_group()
        super().on_server_restart(model)

    def forget_servers(self) -> None:
        """The restarted server lost the group: the next apply forms a new one."""
        self._leave_group()

    def _leave_group(self) -> None:
        for server in self.client.servers:
            try:
                self.client.post(server, "/destroy_weights_update_group",
                                 {"group_name": self.group_name})
            except Exception:  # noqa: BLE001 - the restarted one has no group to destroy
                pass
        if self.group is not None:
            close_update_group(self.group)
        self.group = None


def _reachable_address(client) -> str:
    """127.0.0.1 when every server is on this machine, else this node's host name."""
    from urllib.parse import urlparse

    hosts = {urlparse(client.url_of(s)).hostname for s in client.servers}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    return socket.getfqdn()
