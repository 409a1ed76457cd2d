"""The rollout server's weight-update endpoints, as SGLang's: from disk, from tensors (an
allow-list unpickler), over a weight-update group; the begin/end session tensor and
distributed updates need (``managers/scheduler_components/weight_updater.py``); the
plain-text ``/flush_cache``. Every update is a transaction: checked before anything is
copied. Mixed into :class:`~megatron_paced.rollout.service.RolloutService`, whose lock,
gate and model they use.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import sys

import torch
import torch.distributed as dist

from megatron_paced.rollout.requests import (
    FLUSH_DONE,
    FLUSH_FAILED,
    RequestError,
    TextAnswer,
    int_field,
    optional_version,
    validate_update_shapes,
)
from megatron_paced.rollout.update_group import close_update_group, open_update_group
from megatron_paced.safe_unpickle import UnsafePickleError, loads_weight_payload


class WeightEndpoints:
    """/update_weights_from_*, /*_weights_update_group, /begin|end_weight_update,
    /flush_cache."""

    def flush_cache(self, body: dict) -> "TextAnswer":
        """As SGLang's handler (``entrypoints/http_server.py``): plain text, 400 while
        requests run or wait (the caller retries)."""
        with self.gate:
            if self.num_active:
                return TextAnswer(400, FLUSH_FAILED)
        return TextAnswer(200, FLUSH_DONE)

    def _require_session(self, endpoint: str) -> None:
        if self.weight_update_session and not self.session_open:
            raise RequestError(400, f"{endpoint} must run between begin_weight_update() and "
                                    "end_weight_update()")

    def begin_weight_update(self, body: dict):
        if not self.weight_update_session:
            raise RequestError(404, "no endpoint /begin_weight_update")
        if self.session_open:
            raise RequestError(400, "a weight-update session is already open; call "
                                    "end_weight_update() first")
        self.session_open = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self, body: dict):
        if not self.weight_update_session:
            raise RequestError(404, "no endpoint /end_weight_update")
        if not self.session_open:
            raise RequestError(400, "no weight-update session is open; call "
                                    "begin_weight_update() first")
        self.session_open = False
        return {"success": True, "message": "Success"}

    def _flush_after_update(self, body: dict) -> None:
        """0.5.23: an update asked to flush fails (the weights stay updated) when it cannot."""
        if body.get("flush_cache", True):
            with self.gate:
                busy = self.num_active
            if busy:
                raise RequestError(400, "Weights were updated, but the cache was not flushed "
                                        "because requests are still running or queued. "
                                        "Retract or finish them, then call /flush_cache.")

    def _load_update(self, hf: dict, body: dict, version: str | None) -> dict:
        """Load a partial update, then (0.5.23) fail it if it cannot flush, before the new
        version is set: /model_info keeps the old one when an update fails."""
        with self.lock:
            count = self.load_hf_tensors(hf, complete=False)
            self._flush_after_update(body)
            self._set_version(version)
        return {"success": True, "message": f"loaded {count} parameters"}

    def update_weights_from_disk(self, body: dict):
        version = optional_version(body)  # checked before anything loads
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError(400, "model_path must be a folder path")
        with self.lock:
            count = self.load_hf_dir(path)
            self.model_path = path
            self._flush_after_update(body)  # 0.5.23: fails, /model_info keeps its version
            self._set_version(version)
        return {"success": True, "message": f"loaded {count} parameters from {path}",
                "num_paused_requests": 0}

    def update_weights_from_tensor(self, body: dict):
        import torch.multiprocessing as torch_mp

        version = optional_version(body)  # checked before anything loads
        self._require_session("update_weights_from_tensor")
        torch_mp.set_sharing_strategy("file_system")
        serialized = body.get("serialized_named_tensors")
        if not isinstance(serialized, list) or not serialized or \
                not isinstance(serialized[0], str):
            raise RequestError(400, "serialized_named_tensors must be a non-empty list of "
                                    "base64 strings")
        if body.get("load_format") not in (None, "direct"):
            raise RequestError(400, f"load_format {str(body['load_format'])[:50]!r} is not "
                                    "supported")
        try:
            named = loads_weight_payload(base64.b64decode(serialized[0], validate=True))
            hf = {}
            for name, tensor in named:
                if name in hf:
                    raise RequestError(400, f"{name[:120]!r} appears twice in the update")
                hf[name] = tensor.clone()
        except (binascii.Error, ValueError):
            raise RequestError(400, "serialized_named_tensors[0] is not base64") from None
        except (UnsafePickleError, RuntimeError, OSError) as err:
            raise RequestError(400, f"serialized_named_tensors[0] refused: {err}"[:300]) \
                from None
        return self._load_update(hf, body, version)

    def init_weights_update_group(self, body: dict):
        missing = [k for k in ("master_address", "master_port", "rank_offset", "world_size")
                   if k not in body]
        if missing:
            raise RequestError(400, f"init_weights_update_group needs {', '.join(missing)}")
        backend = body.get("backend", "nccl")
        if backend not in ("nccl", "gloo"):
            raise RequestError(400, f"backend {backend!r}: choose nccl or gloo")
        if backend == "nccl" and self.ctx.device.type != "cuda":
            raise RequestError(400, "backend 'nccl' needs a GPU; this server runs on the CPU "
                                    "(use gloo)")
        name = body.get("group_name", "weight_update_group")
        if not isinstance(name, str) or not name or len(name) > 100:
            raise RequestError(400, "group_name must be a short string")
        address = body["master_address"]
        if not isinstance(address, str) or not self._peer_allowed(address):
            raise RequestError(403, f"master_address {str(address)[:60]!r} is neither a "
                                    "loopback address nor in --allowed-peers")
        port = int_field(body["master_port"], "master_port", low=1, high=65535)
        world_size = int_field(body["world_size"], "world_size", low=2, high=1024)
        rank = int_field(body["rank_offset"], "rank_offset", low=1, high=world_size - 1)
        if name in self.update_groups:  # formed again (a trainer or server restarted)
            close_update_group(self.update_groups.pop(name)[0])
        try:
            group = open_update_group(backend, address, port, rank, world_size, name,
                                      timeout_s=self.limits.update_group_timeout_s)
        except Exception as err:  # noqa: BLE001 - the peer's fault; details in our log only
            print(f"init_weights_update_group {name!r} failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
            raise RequestError(400, f"could not join {name!r} at {address}:{port} within "
                                    f"{self.limits.update_group_timeout_s:.0f} s") from None
        self.update_groups[name] = (group, backend)
        return {"success": True, "message": f"joined {name} as rank {body['rank_offset']} of "
                                            f"{body['world_size']}"}

    def _peer_allowed(self, address: str) -> bool:
        if address in self.allowed_peers or address == "localhost":
            return True
        try:
            return ipaddress.ip_address(address).is_loopback
        except ValueError:
            return False

    def update_weights_from_distributed(self, body: dict):
        version = optional_version(body)  # checked before anything loads
        self._require_session("update_weights_from_distributed")
        name = body.get("group_name", "weight_update_group")
        if name not in self.update_groups:
            raise RequestError(400, f"no weight-update group {name!r}: call "
                                    "/init_weights_update_group first")
        group, backend = self.update_groups[name]
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes) and names):
            raise RequestError(400, "names, dtypes and shapes must be non-empty lists of one "
                                    "length")
        kinds = [getattr(torch, str(d).removeprefix("torch."), None) for d in dtypes]
        if not all(isinstance(k, torch.dtype) and k.is_floating_point for k in kinds):
            raise RequestError(400, f"dtypes {str(dtypes)[:100]}: not all are floating torch "
                                    "dtypes")
        validate_update_shapes(zip(names, shapes), self.model_cfg)  # before any is received
        device = torch.device("cpu") if backend == "gloo" else self.ctx.device
        received = {}
        for tensor_name, kind, shape in zip(names, kinds, shapes):
            tensor = torch.empty(shape, dtype=kind, device=device)
            dist.broadcast(tensor, group=group, group_src=0)
            received[tensor_name] = tensor
        return self._load_update(received, body, version)

    def destroy_weights_update_group(self, body: dict):
        name = body.get("group_name", "weight_update_group")
        entry = self.update_groups.pop(name, None)
        if entry is None:
            return {"success": False, "message": f"no weight-update group {name!r}"}
        close_update_group(entry[0])
        return {"success": True, "message": f"left {name}"}
