"""Weight sync: push the policy's Megatron TP/PP shards to rollout servers, in HF names.

One interface, one class per transport (after slime's pause -> flush -> send -> continue)::

    transport.push(model, version)      # collective over the policy's ranks

1. Every rank walks its stage's parameters; each is all-gathered over TP
   (:func:`~megatron_paced.models.sharding.iter_full_params`, one full parameter at a time) and
   renamed to HF (:mod:`~megatron_paced.models.hf_mapping`); the log-Z table is not a model
   parameter and is never sent.
2. The HF tensors go out in size-bounded buckets (all parts of one Megatron parameter in the
   same bucket), by the ranks that hold TP rank 0 and DP rank 0 of each pipeline stage.
3. ``/flush_cache``; then each server's ``/get_model_info`` must report the new
   ``weight_version``, or the push raises.

Transports:

* :class:`DiskTransport`: safetensors files in a folder (written under a temporary name, then
  renamed), then ``/update_weights_from_disk``. The fallback; works across machines with a
  shared file system.
* :class:`TensorTransport`: ``/update_weights_from_tensor`` with each bucket pickled by
  torch's multiprocessing pickler (shared memory on the CPU, CUDA IPC handles on GPUs) --
  the colocated path.
* NCCL broadcast (``/init_weights_update_group`` + ``/update_weights_from_distributed``) is
  not implemented yet; it needs SGLang on GPUs to be tested.

Usage::

    sync = TensorTransport(client, model_cfg, ctx, bucket_bytes=64 << 20)
    sync.push(policy.modules()[0], version=f"step-{step}")
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_paced.models.hf_mapping import megatron_to_hf
from megatron_paced.models.sharding import iter_full_params


def iter_hf_buckets(model, model_cfg, ctx, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This stage's parameters as HF (name, tensor) buckets of at most ``bucket_bytes`` (a
    single larger parameter forms its own bucket). Collective over TP."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in iter_full_params(model, ctx.tp_group):
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


class _Transport:
    def __init__(self, client, model_cfg, ctx, *, bucket_bytes: int = 256 << 20) -> None:
        self.client = client
        self.model_cfg = model_cfg
        self.ctx = ctx
        self.bucket_bytes = bucket_bytes
        self.version: str | None = None

    @property
    def is_sender(self) -> bool:
        return self.ctx.tp_rank == 0 and self.ctx.dp_rank == 0

    def push(self, model, version: str) -> None:
        self._send(model, str(version))
        dist.barrier()
        if dist.get_rank() == 0:
            self.client.post_all("/flush_cache")
            for info in self.client.post_all("/get_model_info"):
                if info.get("weight_version") != str(version):
                    raise RuntimeError(f"a rollout server reports weight_version "
                                       f"{info.get('weight_version')!r} after pushing {version!r}")
        self.version = str(version)

    def _send(self, model, version: str) -> None:
        raise NotImplementedError


class DiskTransport(_Transport):
    """HF safetensors in a folder, then ``/update_weights_from_disk``."""

    def __init__(self, client, model_cfg, ctx, *, directory: str, **kwargs) -> None:
        super().__init__(client, model_cfg, ctx, **kwargs)
        self.directory = directory

    def _send(self, model, version: str) -> None:
        from safetensors.torch import save_file

        staging = f"{self.directory}.staging"
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
        if dist.get_rank() == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
            os.replace(staging, self.directory)
            self.client.post_all("/update_weights_from_disk",
                                 {"model_path": os.path.abspath(self.directory),
                                  "weight_version": version, "flush_cache": True})


class TensorTransport(_Transport):
    """Buckets pickled into shared memory (CPU) or CUDA IPC handles (GPU), per request."""

    def _send(self, model, version: str) -> None:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing as torch_mp

        torch_mp.set_sharing_strategy("file_system")
        buckets = list(iter_hf_buckets(model, self.model_cfg, self.ctx, self.bucket_bytes))
        if not self.is_sender:
            return
        for index, bucket in enumerate(buckets):
            shared = [(name, tensor.clone().share_memory_()) for name, tensor in bucket]
            payload = base64.b64encode(bytes(ForkingPickler.dumps(shared))).decode()
            last = index == len(buckets) - 1
            self.client.post_all("/update_weights_from_tensor", {
                "serialized_named_tensors": [payload], "flush_cache": last,
                "weight_version": version if last else None})
            del shared  # the server copied the tensors before answering


def staging_directory(prefix: str = "paced-weights-") -> str:
    """A fresh folder for :class:`DiskTransport` under the system temporary directory."""
    return os.path.join(tempfile.mkdtemp(prefix=prefix), "weights")
