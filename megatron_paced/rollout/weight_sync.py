"""Weight sync: push the policy's Megatron TP/PP shards to rollout servers, in HF names.

One interface, one class per transport (after slime's pause -> flush -> send -> continue)::

    transport.push(model, version)      # collective over the policy's ranks

1. Every rank walks its stage's parameters; each is all-gathered over TP
   (:func:`~megatron_paced.models.sharding.iter_full_params`, one full parameter at a time) and
   renamed to HF (:mod:`~megatron_paced.models.hf_mapping`); the log-Z table is not a model
   parameter and is never sent.
2. The HF tensors go out in size-bounded buckets (all parts of one Megatron parameter in the
   same bucket), by the ranks that hold TP rank 0 and DP rank 0 of each pipeline stage.
3. ``/flush_cache`` (retried while requests run; SGLang answers it in plain text); then each
   server's ``/model_info`` must report the new ``weight_version``, or the push raises.

Tensor and distributed updates run inside SGLang's weight-update session
(``/begin_weight_update`` ... ``/end_weight_update``; 0.5.21 and 0.5.23 refuse them
outside one, ``managers/scheduler_components/weight_updater.py``; a server without the
endpoints, 404, is updated without). The updates themselves carry ``flush_cache: false``:
0.5.21 asserts inside its scheduler when that flush fails, 0.5.23 fails the update; the
separate, retried ``/flush_cache`` afterwards is safe on both.

Transports:

* :class:`DiskTransport`: safetensors files in a folder (written under a temporary name, then
  renamed), then ``/update_weights_from_disk``. The fallback; works across machines with a
  shared file system.
* :class:`TensorTransport`: ``/update_weights_from_tensor`` with each bucket pickled by
  torch's multiprocessing pickler (shared memory on the CPU, CUDA IPC handles on GPUs) --
  the colocated path.
* ``DistributedTransport`` (``--weight-sync nccl``, :mod:`megatron_paced.rollout.update_group`):
  a broadcast over a weight-update group.

Usage::

    sync = TensorTransport(client, model_cfg, ctx, bucket_bytes=64 << 20)
    sync.push(policy.modules()[0], version=f"step-{step}")
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_paced.models.hf_mapping import megatron_to_hf
from megatron_paced.models.proj_z import PREFIX as PROJ_Z_PREFIX
from megatron_paced.models.sharding import iter_full_params


def iter_hf_buckets(model, model_cfg, ctx,
                    bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This stage's parameters as HF (name, tensor) buckets of at most ``bucket_bytes`` (a
    single larger parameter forms its own bucket). Collective over TP."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in iter_full_params(model, ctx.tp_group):
        if name.startswith(PROJ_Z_PREFIX):
            continue  # FlowRL's log-Z head: the trainer's, not the engine's
        parts = list(megatron_to_hf({name: tensor}, model_cfg).items())
        if not parts:
            continue  # e.g. the tied output weight of the last stage
        part_bytes = sum(t.numel() * t.element_size() for _, t in parts)
        if bucket and size + part_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend((n, t.contiguous()) for n, t in parts)
        size += part_bytes
    if bucket:
        yield bucket


@dataclass
class PreparedPush:
    """One version of the weights, ready to send without the trainer's collectives (on the
    rank that applies it): what an asynchronous push queues behind the generation in flight,
    and what a restarted server is given again."""

    version: str
    payload: object
    """The transport's: request bodies (tensor), a folder (disk) or HF buckets (nccl)."""


FLUSH_RETRY_S = 0.05


@contextlib.contextmanager
def weight_update_session(client, servers):
    """SGLang's weight-update session around tensor and distributed updates:
    ``/begin_weight_update`` on each server, then ``/end_weight_update`` (also when an update
    failed: a session left open refuses the next begin). A server that has no such endpoint
    (404) is updated without one; one whose session a failed push left open is closed
    first."""
    import urllib.error

    opened = []  # a begin that fails leaves the earlier ones open: the next push closes them
    for server in servers:
        try:
            client.post(server, "/begin_weight_update", {})
        except urllib.error.HTTPError as err:
            if err.code == 404:
                continue
            if err.code != 400 or "already open" not in str(err):
                raise
            client.post(server, "/end_weight_update", {})
            client.post(server, "/begin_weight_update", {})
        opened.append(server)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for server in opened:
            try:
                client.post(server, "/end_weight_update", {})
            except (OSError, urllib.error.URLError) as err:
                # A server that restarted mid-push has no session to end (400) or is gone;
                # the update's own error, if any, is the one to report.
                if not failed and not (isinstance(err, urllib.error.HTTPError)
                                       and err.code == 400 and "no weight-update" in str(err)):
                    raise


def flush_cache(client, servers, *, timeout_s: float) -> None:
    """``/flush_cache`` on each server, retried while it is refused because requests are still
    running or waiting (SGLang answers 400 then)."""
    import urllib.error

    deadline = time.monotonic() + timeout_s
    for server in servers:
        while True:
            try:
                client.post(server, "/flush_cache")
                break
            except urllib.error.HTTPError as err:
                if err.code != 400 or time.monotonic() > deadline:
                    raise
                time.sleep(FLUSH_RETRY_S)


class _Transport:
    uses_session = True
    """Its updates run inside SGLang's /begin_weight_update ... /end_weight_update."""

    def __init__(self, client, model_cfg, ctx, *, bucket_bytes: int = 256 << 20,
                 keep_last: bool = False) -> None:
        self.client = client
        self.model_cfg = model_cfg
        self.ctx = ctx
        self.bucket_bytes = bucket_bytes
        self.keep_last = keep_last
        """Keep the last applied push (asynchronous rollouts): a restarted server is given it
        again from the thread that found it dead, with no collective."""
        self.version: str | None = None
        self.last_applied: PreparedPush | None = None

    @property
    def is_sender(self) -> bool:
        return self.ctx.tp_rank == 0 and self.ctx.dp_rank == 0

    def push(self, model, version: str) -> None:
        """Collective over the trainer: every server holds ``model`` as ``version`` after.
        Rank 0 holds one weight-update session over every stage's sends."""
        first = dist.get_rank() == 0
        with self.session(self.client.servers) if first else contextlib.nullcontext():
            dist.barrier()  # the session is open before any stage sends
            self._send(model, str(version))
            dist.barrier()
        if first:
            self.finish(str(version), self.client.servers)
        self.version = str(version)

    def session(self, servers):
        """The weight-update session this transport's updates need (none for disk)."""
        if not self.uses_session:
            return contextlib.nullcontext()
        return weight_update_session(self.client, servers)

    def apply_in_session(self, prepared: PreparedPush, servers) -> None:
        """:meth:`apply` inside the session (no trainer collective: any thread)."""
        with self.session(servers):
            self.apply(prepared, servers)

    def finish(self, version: str, servers) -> None:
        """After the last bucket: flush (retried while requests run), then each server must
        report ``version``."""
        flush_cache(self.client, servers, timeout_s=self.client.timeout_s)
        for server in servers:
            info = self.client.model_info(server)
            if info.get("weight_version") != str(version):
                raise RuntimeError(f"rollout server {self.client.url_of(server)} reports "
                                   f"weight_version {info.get('weight_version')!r} after "
                                   f"pushing {version!r}")

    def _send(self, model, version: str) -> None:
        prepared = self.prepare(model, version)
        if prepared is not None:
            self.apply(prepared, self.client.servers)

    def prepare(self, model, version: str) -> PreparedPush | None:
        """Gather this version (collective over the trainer's ranks); the rank that applies it
        gets the :class:`PreparedPush`, the others None."""
        raise NotImplementedError

    def apply(self, prepared: PreparedPush, servers) -> None:
        """Send a prepared version to ``servers`` (no trainer collective: any thread)."""
        raise NotImplementedError

    def server_tp_sizes(self, servers=None) -> list[int]:
        """Each server's tensor-parallel size (SGLang's ``/server_info``; asked again after a
        restart: a restarted server may come back with other arguments)."""
        return [int(self.client.server_info(s).get("tp_size") or 1)
                for s in (self.client.servers if servers is None else servers)]

    def on_server_restart(self, model) -> None:
        """A server came back empty: give it the current weights."""
        self.push(model, version=self.version)

    def forget_servers(self) -> None:
        """A server restarted: drop what the transport holds with the servers (nothing)."""

    def close(self) -> None:
        """The end of the run: release what the transport made (nothing here)."""

    def replay_last(self, server) -> None:
        """A server came back empty during asynchronous rollouts: give it the last applied
        version again (this thread, no collective)."""
        if self.last_applied is None:
            raise RuntimeError("a rollout server restarted before any weights were pushed")
        self.apply_in_session(self.last_applied, [server])
        self.finish(self.last_applied.version, [server])


class DiskTransport(_Transport):
    """HF safetensors in a folder, then ``/update_weights_from_disk``. With
    :attr:`keep_last`, one folder per version (the one being loaded must not be replaced
    while a newer one is written). ``directory`` must be the same on every rank (each
    pipeline stage's sender writes its files there): :func:`shared_staging_directory`."""

    uses_session = False  # SGLang loads from disk without a session

    def __init__(self, client, model_cfg, ctx, *, directory: str, owns_parent: bool = False,
                 **kwargs) -> None:
        super().__init__(client, model_cfg, ctx, **kwargs)
        self.directory = directory
        self.owns_parent = owns_parent
        """The folder above ``directory`` was made for this run (:func:`staging_directory`)
        and is removed by :meth:`close`, every staged version with it."""

    def close(self) -> None:
        if self.owns_parent and dist.get_rank() == 0:
            shutil.rmtree(os.path.dirname(self.directory), ignore_errors=True)

    def prepare(self, model, version: str) -> PreparedPush | None:
        from safetensors.torch import save_file

        final = f"{self.directory}-v{version}" if self.keep_last else self.directory
        staging = f"{final}.staging"
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        dist.barrier()
        for index, bucket in enumerate(iter_hf_buckets(model, self.model_cfg, self.ctx,
                                                       self.bucket_bytes)):
            if self.is_sender:
                name = f"model-pp{self.ctx.pp_rank:03d}-{index:05d}.safetensors"
                tmp = os.path.join(staging, f".{name}.tmp")
                save_file(dict(bucket), tmp)
                os.replace(tmp, os.path.join(staging, name))
        dist.barrier()
        if dist.get_rank() != 0:
            return None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return PreparedPush(version, os.path.abspath(final))

    def apply(self, prepared: PreparedPush, servers) -> None:
        for server in servers:
            self.client.post(server, "/update_weights_from_disk",
                             {"model_path": prepared.payload, "weight_version": prepared.version,
                              "flush_cache": False})  # flushed by finish(), retried
        if self.keep_last:
            previous, self.last_applied = self.last_applied, prepared
            if previous is not None and previous.payload != prepared.payload:
                shutil.rmtree(previous.payload, ignore_errors=True)


class TensorTransport(_Transport):
    """Buckets pickled into shared memory (CPU) or CUDA IPC handles (GPU), per request. A
    prepared push holds the tensors (copies with :attr:`keep_last`, the policy steps on);
    each apply shares fresh copies: a handle is opened once (a restarted server could not
    open the one the first server read)."""

    def prepare(self, model, version: str) -> PreparedPush | None:
        buckets = list(iter_hf_buckets(model, self.model_cfg, self.ctx, self.bucket_bytes))
        if not self.is_sender:
            return None
        if self.keep_last:
            buckets = [[(name, tensor.clone()) for name, tensor in bucket]
                       for bucket in buckets]
        return PreparedPush(version, buckets)

    def apply(self, prepared: PreparedPush, servers) -> None:
        import torch.multiprocessing as torch_mp

        torch_mp.set_sharing_strategy("file_system")
        tp_sizes = self.server_tp_sizes(servers)
        for index, bucket in enumerate(prepared.payload):
            shared = [(name, tensor.clone().share_memory_()) for name, tensor in bucket]
            last = index == len(prepared.payload) - 1
            for server, tp_size in zip(servers, tp_sizes):
                self.client.post(server, "/update_weights_from_tensor", {
                    "serialized_named_tensors": serialize_per_rank(shared, tp_size),
                    "flush_cache": False,  # flushed by finish(), retried
                    "weight_version": prepared.version if last else None})
            del shared  # the server copied the tensors before answering
        self.last_applied = prepared if self.keep_last else None


def serialize_per_rank(named_tensors: list[tuple[str, torch.Tensor]], tp_size: int) -> list[str]:
    """``serialized_named_tensors`` for a server of ``tp_size`` ranks: rank r deserializes
    entry r (``TpModelWorker.deserialize_own_rank``), and each entry is its own pickling, as
    SGLang's ``MultiprocessingSerializer`` makes them per rank: a CUDA IPC handle's reference
    count is kept per deserialization, so ranks must not share one payload."""
    from multiprocessing.reduction import ForkingPickler

    return [base64.b64encode(bytes(ForkingPickler.dumps(named_tensors))).decode()
            for _ in range(tp_size)]


def staging_directory(prefix: str = "paced-weights-", parent: str | None = None) -> str:
    """A fresh folder for :class:`DiskTransport` under ``parent`` (default: the system
    temporary directory)."""
    return os.path.join(tempfile.mkdtemp(prefix=prefix, dir=parent), "weights")


def shared_staging_directory(parent: str | None = None) -> str:
    """One staging folder for the whole trainer: made by rank 0 and broadcast, so that the
    senders of every pipeline stage write into the folder the servers are told to load
    (collective when distributed). With several nodes, ``parent`` must be on a file system
    every node and server shares."""
    paths = [staging_directory(parent=parent) if not dist.is_initialized() or
             dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(paths, src=0)
    return paths[0]
