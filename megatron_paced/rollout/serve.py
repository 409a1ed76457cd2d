"""A rollout server with SGLang's native HTTP endpoints, backed by the embedded engine.

It lets the SGLang client, the weight sync and the fault handling run against a real process
on any machine (SGLang itself needs CUDA). Requests and answers follow SGLang's schema
(``sglang/srt/managers/io_struct.py``); token ids only (no server-side tokenizer):

    GET  /health, /health_generate, /model_info (and the deprecated /get_model_info)
    POST /generate                     input_ids (one list or a batch), sampling_params
                                       (with ``n``; a list per prompt), return_logprob, rid
                                       (one per prompt); answers prompt-major, as SGLang's
                                       tokenizer manager: output i * n + j is sample j of
                                       prompt i, with meta_info.prompt_tokens and
                                       weight_versions spans
    POST /update_weights_from_disk     {"model_path": HF safetensors folder, "weight_version"}
    POST /update_weights_from_tensor   {"serialized_named_tensors": [base64 of a pickled
                                       [(hf_name, tensor), ...] in shared memory], ...}
    POST /init_weights_update_group    join a weight-update group (gloo on the CPU, nccl on a
                                       GPU) as rank ``rank_offset``
    POST /update_weights_from_distributed  {"names", "dtypes", "shapes", "group_name", ...}:
                                       receive each tensor by broadcast from rank 0, then load
    POST /destroy_weights_update_group
    GET  /server_info, /get_server_info  {"tp_size": 1, "base_gpu_id", ...}
    POST /begin_weight_update, /end_weight_update
                                       SGLang's weight-update session: tensor and distributed
                                       updates are refused outside one (0.5.21-0.5.23;
                                       ``--weight-update-session none``: a server without
                                       the endpoints, 404)
    POST /pause_generation             {"mode": abort | retract | in_place}: new /generate
                                       requests wait (abort: are answered with
                                       finish_reason abort) until /continue_generation; one
                                       already generating finishes on its weights, tagged
                                       with their version (meta_info.weight_version)
    POST /continue_generation, /update_weight_version, /release_memory_occupation,
         /resume_memory_occupation
    GET|POST /flush_cache              plain text, as SGLang's: 200 "Cache flushed...", 400
                                       while requests run or wait

Sampling as SGLang's (``layers/sampler.py``): ``sampling_seed`` acts only with
``--enable-deterministic-inference``, and then the n copies of a prompt share it; log-probs
are of the temperature-scaled logits unless ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``. Where the
sglang wheel is installed (without its dependencies), every /generate body also goes
through SGLang's own ``GenerateReqInput.normalize_batch_and_arguments``
(:mod:`megatron_paced.rollout.sglang_source`).

A server launched by the trainer (``$MEGATRON_PACED_PARENT_PID`` set) exits when the trainer
is gone, however it ended.

Trust (``docs/security.md``): it binds to 127.0.0.1 unless told otherwise. Its key comes from
the environment (``MEGATRON_PACED_API_KEY``) or ``--api-key-file``, never from argv by the
trainer (which generates one per run for the servers it launches). Without a key, weight
updates and memory control are refused (403) and only loopback binds are allowed; with one,
every endpoint but ``/health`` needs ``Authorization: Bearer KEY`` (compared in constant
time). The body is capped (``--max-body-mb``) and the key checked before it is read; sockets
time out; at most ``--max-workers`` requests are served at once; ``n``, prompts per request
and total tokens are bounded. Weight payloads are unpickled through an allow-list of torch's
tensor-rebuild functions (``megatron_paced/safe_unpickle.py``), and every weight update is a
transaction: names, shapes, dtypes and finiteness are checked before anything is copied, so a
failed update leaves the weights and ``weight_version`` as they were. A bad request is a 4xx
with a message (checked in ``rollout/requests.py``); a 500 is a bug. Model calls are
serialized by one lock, so a weight update never interleaves with a generation.

Usage::

    python -m megatron_paced.rollout.serve --model tiny-llama --seed 1234 --port 30000
    python -m megatron_paced.rollout.serve --hf-dir ckpt/ --port 0 --port-file port.txt
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import ipaddress
import json
import math
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist

from megatron_paced.config import ConfigError
from megatron_paced.rollout.requests import (
    RequestError, ServerLimits, int_field, optional_version, parse_generate_request,
    validate_hf_update, validate_update_shapes, version_string,
)
from megatron_paced.utils import free_port

API_KEY_ENV = "MEGATRON_PACED_API_KEY"
PARENT_PID_ENV = "MEGATRON_PACED_PARENT_PID"  # set by the trainer that launches the server
WEIGHT_ENDPOINTS = {"/update_weights_from_disk", "/update_weights_from_tensor",
                    "/pause_generation", "/continue_generation",
                    "/update_weight_version", "/release_memory_occupation",
                    "/resume_memory_occupation", "/init_weights_update_group",
                    "/update_weights_from_distributed", "/destroy_weights_update_group",
                    "/begin_weight_update", "/end_weight_update"}
OPEN_ENDPOINTS = {"/health"}  # answered without a key even when the server has one


FLUSH_DONE = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
              "running or waiting requests, the operation will not be performed.)\n")
FLUSH_FAILED = "Flush cache failed.\n"  # SGLang's answer when the message is empty


@dataclass
class TextAnswer:
    """A plain-text answer (SGLang's ``Response(content=...)``: no JSON)."""

    status: int
    text: str


class FairLock:
    """A lock granted in the order it was asked for (``threading.Lock`` lets a thread that
    has just released it take it again ahead of the waiters). Each request holds it for
    one bounded call (the limits of :class:`ServerLimits`), so a waiter's delay is bounded by
    the requests ahead of it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class RolloutService:
    """The model, its engine and the state the endpoints share."""

    def __init__(self, model_cfg, *, seed: int, hf_dir: str | None, max_sequence_length: int,
                 max_batch_size: int, limits: ServerLimits = ServerLimits(),
                 allowed_peers: tuple[str, ...] = (), generate_delay_s: float = 0.0,
                 weight_version_lag: int = 0, deterministic: bool = False,
                 weight_update_session: bool = True, base_gpu_id: int = 0) -> None:
        from megatron_paced.config import ParallelConfig
        from megatron_paced.models.gpt import build_gpt_model
        from megatron_paced.parallel import initialize_parallel
        from megatron_paced.rollout.engine import EmbeddedEngine

        # The server is a world of one, even when started from a torchrun-launched trainer
        # whose rendezvous variables it inherits.
        for name in list(os.environ):
            if name.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_")) or name in (
                    "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                del os.environ[name]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(base_gpu_id)
        self.ctx = initialize_parallel(ParallelConfig(), seed=seed)
        self.model_cfg = model_cfg
        self.model = build_gpt_model(model_cfg, self.ctx, seed=seed)
        self.engine = EmbeddedEngine([self.model], self.ctx, vocab_size=model_cfg.vocab_size,
                                     max_sequence_length=max_sequence_length,
                                     max_batch_size=max_batch_size)
        self.model_path = hf_dir or f"random-init(seed={seed})"
        self.max_sequence_length = max_sequence_length
        self.limits = limits
        self.allowed_peers = allowed_peers
        self.weight_version = "default"
        self.released = False
        self.lock = FairLock()  # first come, first served: no request starves
        self.gate = threading.Condition()  # pause_generation / continue_generation
        self.paused, self.pause_mode, self.num_active = False, "abort", 0
        self.generate_delay_s = generate_delay_s
        self.weight_version_lag = weight_version_lag
        self.num_requests = 0
        self.deterministic = deterministic
        self.tempered_log_probs = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() \
            not in ("1", "true")  # read once at start, as SGLang's sampler does
        self.weight_update_session = weight_update_session
        self.session_open = False
        self.base_gpu_id = base_gpu_id
        self.update_groups: dict[str, tuple[object, str]] = {}  # name -> (group, backend)
        if hf_dir:
            self.load_hf_dir(hf_dir)

    # ---- weights ---------------------------------------------------------------------------
    def load_hf_tensors(self, hf: dict[str, torch.Tensor], *, complete: bool) -> int:
        """Validate, then load (a transaction: on any error nothing has changed)."""
        from megatron_paced.models.hf_mapping import hf_to_megatron
        from megatron_paced.models.sharding import load_full_params_

        validate_hf_update(hf, self.model_cfg, complete=complete)
        try:
            full = hf_to_megatron(hf, self.model_cfg, complete=complete,
                                  padded_vocab_size=self.model_cfg.padded_vocab_size(1))
            return len(load_full_params_(self.model, full, tp_rank=0, tp_size=1,
                                         strict=complete))
        except (KeyError, ValueError, TypeError) as err:  # checked before any copy
            raise RequestError(400, f"weight update refused: {err}") from None

    def load_hf_dir(self, path: str) -> int:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        refused = RequestError(400, "model_path is not a folder of .safetensors files this "
                                    "server can read")
        try:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        except OSError:
            raise refused from None
        if not files:
            raise refused
        hf: dict[str, torch.Tensor] = {}
        for name in files:
            try:
                tensors = load_file(os.path.join(path, name))
            except (OSError, SafetensorError, ValueError) as err:
                raise RequestError(400, f"{name}: not a readable safetensors file "
                                        f"({type(err).__name__})") from None
            duplicated = sorted(set(tensors) & set(hf))
            if duplicated:
                raise RequestError(400, f"{name}: {duplicated[0]!r} is also in another file")
            hf.update(tensors)
        return self.load_hf_tensors(hf, complete=True)

    # ---- endpoints ---------------------------------------------------------------------------
    def generate(self, body: dict):
        request = parse_generate_request(body, vocab_size=self.model_cfg.vocab_size,
                                         max_sequence_length=self.max_sequence_length,
                                         limits=self.limits)
        if self.released:
            raise RequestError(400, "memory is released; call /resume_memory_occupation")
        prompts, n = request.prompts, request.n
        with self.gate:  # a paused server holds new requests until /continue_generation
            while self.paused and self.pause_mode != "abort":
                self.gate.wait()
            aborted = self.paused
            self.num_active += not aborted
        if aborted:
            return self._outputs(request, None, self.weight_version)
        try:
            with self.lock:
                if self.paused and self.pause_mode == "abort":  # paused while it waited
                    return self._outputs(request, None, self.weight_version)
                self.num_requests += 1
                if self.generate_delay_s:
                    time.sleep(self.generate_delay_s)
                completions = self._sample(request)
                version = self.weight_version
        finally:
            with self.gate:
                self.num_active -= not aborted
                self.gate.notify_all()
        return self._outputs(request, completions, self._tag(version))

    def _sample(self, request) -> list[list]:
        """The completions, [prompt][sample]. With --enable-deterministic-inference each
        output is sampled from its prompt's seed (SGLang uses 42 where none is given), so
        the n copies of a prompt are the same; without it seeds are ignored."""
        prompts, n = request.prompts, request.n
        tempered = self.tempered_log_probs
        if not self.deterministic:
            return self.engine.generate(prompts, n, request.sampling, seed=self.num_requests,
                                        tempered_log_probs=tempered)
        rows = [prompt for prompt in prompts for _ in range(n)]
        seeds = [42 if seed is None else seed for seed in request.seeds for _ in range(n)]
        flat = self.engine.generate_seeded(rows, request.sampling, seeds,
                                           tempered_log_probs=tempered)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _tag(self, version: str) -> str:
        """The version a generation is tagged with (--debug-weight-version-lag: older)."""
        if self.weight_version_lag and version.lstrip("-").isdigit():
            return str(int(version) - self.weight_version_lag)
        return version

    def _outputs(self, request, completions, version: str):
        """SGLang's answer, prompt-major (``TokenizerManager._handle_batch_request``: for
        each prompt, its n samples); ``completions`` None: aborted. With n > 1 SGLang gives
        each sample a fresh rid."""
        prompts, n, rids = request.prompts, request.n, request.rids
        outputs = []
        for index in range(len(prompts)):
            for sample in range(n):
                if n > 1:
                    rid = uuid.uuid4().hex
                elif isinstance(rids, list):
                    rid = rids[index]
                elif isinstance(rids, str):
                    rid = rids if request.single else f"{rids}_{index}"
                else:
                    rid = uuid.uuid4().hex
                if completions is None:
                    outputs.append({"text": "", "output_ids": [], "meta_info": {
                        "id": rid, "finish_reason": {"type": "abort", "message": "paused"},
                        "prompt_tokens": len(prompts[index]), "weight_version": version}})
                    continue
                c = completions[index][sample]
                finish = ({"type": "stop", "matched": c.token_ids[-1]}
                          if c.finish_reason == "stop" else
                          {"type": "length", "length": len(c.token_ids)})
                meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompts[index]),
                        "completion_tokens": len(c.token_ids), "cached_tokens": 0,
                        "weight_version": version,
                        "weight_versions": [{"version": version, "start": 0,
                                             "end": len(c.token_ids)}]}
                if request.return_logprob:
                    meta["output_token_logprobs"] = [[lp, t, None]
                                                     for lp, t in zip(c.log_probs, c.token_ids)]
                outputs.append({"text": "", "output_ids": c.token_ids, "meta_info": meta})
        return outputs[0] if request.single and n == 1 else outputs

    def pause_generation(self, body: dict):
        """SGLang's /pause_generation: new requests wait (in_place, retract) or are aborted
        (abort) until /continue_generation; a request already generating finishes on the
        weights it started with and is tagged with their version."""
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise RequestError(400, f"mode {str(mode)[:30]!r}: choose abort, retract or "
                                    "in_place")
        with self.gate:
            self.paused, self.pause_mode = True, mode
            self.gate.notify_all()
        return {"success": True, "message": f"paused ({mode})"}

    def continue_generation(self, body: dict):
        with self.gate:
            self.paused = False
            self.gate.notify_all()
        return {"success": True, "message": "generation continues"}

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

    def update_weights_from_disk(self, body: dict):
        version = optional_version(body)  # checked before anything loads
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError(400, "model_path must be a folder path")
        with self.lock:
            count = self.load_hf_dir(path)
            self._set_version(version)
            self.model_path = path
        self._flush_after_update(body)
        return {"success": True, "message": f"loaded {count} parameters from {path}",
                "num_paused_requests": 0}

    def update_weights_from_tensor(self, body: dict):
        import torch.multiprocessing as torch_mp

        from megatron_paced.safe_unpickle import UnsafePickleError, loads_weight_payload

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
        with self.lock:
            count = self.load_hf_tensors(hf, complete=False)
            self._set_version(version)
        self._flush_after_update(body)
        return {"success": True, "message": f"loaded {count} parameters"}

    def init_weights_update_group(self, body: dict):
        from megatron_paced.rollout.weight_sync import close_update_group, open_update_group

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
        with self.lock:
            count = self.load_hf_tensors(received, complete=False)
            self._set_version(version)
        self._flush_after_update(body)
        return {"success": True, "message": f"loaded {count} parameters"}

    def destroy_weights_update_group(self, body: dict):
        from megatron_paced.rollout.weight_sync import close_update_group

        name = body.get("group_name", "weight_update_group")
        entry = self.update_groups.pop(name, None)
        if entry is None:
            return {"success": False, "message": f"no weight-update group {name!r}"}
        close_update_group(entry[0])
        return {"success": True, "message": f"left {name}"}

    def server_info(self):
        """A few of SGLang's resolved server arguments (flat, as ``ServerArgs.resolved_dict``)."""
        return {"tp_size": 1, "dp_size": 1, "model_path": self.model_path,
                "base_gpu_id": self.base_gpu_id,
                "enable_deterministic_inference": self.deterministic,
                "weight_version": self.weight_version, "version": "megatron-paced"}

    def _set_version(self, version: str | None) -> None:
        if version is not None:
            self.weight_version = version

    def update_weight_version(self, body: dict):
        if "new_version" not in body:
            raise RequestError(400, "new_version is required")
        self.weight_version = version_string(body["new_version"], "new_version")
        return {"success": True, "message": f"Weight version updated to {self.weight_version}",
                "new_version": self.weight_version}

    def model_info(self):
        return {"model_path": self.model_path, "weight_version": self.weight_version,
                "is_generation": True, "architecture": self.model_cfg.architecture}


def make_handler(service: RolloutService, api_key: str | None):
    limits = service.limits

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.socket_timeout_s  # socketserver sets it on the connection

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, payload=None) -> None:
            if isinstance(payload, TextAnswer):
                status, data, kind = payload.status, payload.text.encode(), \
                    "text/plain; charset=utf-8"
            else:
                data = b"" if payload is None else json.dumps(payload).encode()
                kind = "application/json"
            path = self.path.split("?", 1)[0]
            if not path.startswith("/health"):  # a line per request (the trainer's log file)
                print(f"{self.command} {path[:100]} {status}", file=sys.stderr, flush=True)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            text = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(411, "chunked bodies are not accepted: send Content-Length")
            if text is None or text.strip() == "":
                return {}
            if not text.strip().isdigit():
                raise RequestError(400, f"Content-Length {text[:30]!r} is not a non-negative "
                                        "integer")
            length = int(text)
            if length > limits.max_body_bytes:
                raise RequestError(413, f"body of {length} bytes; at most "
                                        f"{limits.max_body_bytes} (--max-body-mb)")
            if not length:
                return {}
            raw = self.rfile.read(length)
            if len(raw) != length:
                raise RequestError(400, "the body ended before Content-Length bytes")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise RequestError(400, f"body is not JSON: {getattr(err, 'msg', err)}") \
                    from None
            if not isinstance(body, dict):
                raise RequestError(400, "body must be a JSON object")
            return body

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization") or ""
            return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            from megatron_paced.compat import cpu_compat_in_this_thread

            with cpu_compat_in_this_thread():
                self._route()

        def _check_access(self, path: str) -> None:
            """Before the body is read: a key for everything but /health when the server has
            one; no weight or memory control at all when it has none."""
            if path in OPEN_ENDPOINTS:
                return
            if api_key is None:
                if path in WEIGHT_ENDPOINTS:
                    raise RequestError(403, f"{path} is off: this server has no key (set "
                                            f"{API_KEY_ENV} or --api-key-file to enable "
                                            "weight updates)")
                return
            if not self._authorized():
                raise RequestError(401, "this server needs Authorization: Bearer <api key>")

        def _route(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                self._check_access(path)
                body = self._body()
                if path in ("/health", "/health_generate", "/ready"):
                    return self._reply(200 if not service.released or path == "/health" else 503)
                routes = {
                    "/generate": service.generate,
                    "/update_weights_from_disk": service.update_weights_from_disk,
                    "/update_weights_from_tensor": service.update_weights_from_tensor,
                    "/update_weight_version": service.update_weight_version,
                    "/init_weights_update_group": service.init_weights_update_group,
                    "/update_weights_from_distributed": service.update_weights_from_distributed,
                    "/destroy_weights_update_group": service.destroy_weights_update_group,
                    "/pause_generation": service.pause_generation,
                    "/continue_generation": service.continue_generation,
                    "/flush_cache": service.flush_cache,
                    "/begin_weight_update": service.begin_weight_update,
                    "/end_weight_update": service.end_weight_update,
                }
                if path in routes:
                    return self._reply(200, routes[path](body))
                if path in ("/get_model_info", "/model_info"):
                    return self._reply(200, service.model_info())
                if path in ("/server_info", "/get_server_info"):
                    return self._reply(200, service.server_info())
                if path == "/release_memory_occupation":
                    service.released = True
                    return self._reply(200, {})
                if path == "/resume_memory_occupation":
                    service.released = False
                    return self._reply(200, {})
                raise RequestError(404, f"no endpoint {path[:100]}")
            except RequestError as err:
                self._reply(err.status, {"error": {"message": str(err), "code": err.status}})
            except (OSError, TimeoutError):  # the client went away or stalled: nothing to say
                self.close_connection = True
            except Exception:  # noqa: BLE001 - a bug: logged here, not shown to the caller
                traceback.print_exc()
                self._reply(500, {"error": {"message": "internal error (see the server log)",
                                            "code": 500}})

    return Handler


class BoundedHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with at most ``max_workers`` requests in flight; a connection
    beyond that gets a 503 at once instead of a thread."""

    daemon_threads = True

    def __init__(self, address, handler, max_workers: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_workers)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def read_api_key(args) -> str | None:
    """The server's key: ``--api-key-file``, else ``$MEGATRON_PACED_API_KEY``, else
    ``--api-key`` (visible in ``ps``: for a manual start only)."""
    if args.api_key_file:
        try:
            with open(args.api_key_file) as f:
                key = f.read().strip()
        except OSError as err:
            raise ConfigError(f"--api-key-file {args.api_key_file!r}: {err.strerror}") from None
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file!r} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or args.api_key or None


def _startup_checks(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} must be in [0, 65535]")
    for flag in ("max_batch_size", "max_n", "max_prompts_per_request", "max_total_tokens",
                 "max_workers", "max_sequence_length"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    for flag in ("max_body_mb", "socket_timeout", "update_group_timeout"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{flag.replace('_', '-')} {value} must be a positive number")
    if args.base_gpu_id < 0:
        raise ConfigError(f"--base-gpu-id {args.base_gpu_id} must be >= 0")
    if not (math.isfinite(args.debug_generate_delay) and args.debug_generate_delay >= 0):
        raise ConfigError(f"--debug-generate-delay {args.debug_generate_delay} must be >= 0")
    if args.hf_dir and not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        raise ConfigError(f"--hf-dir {args.hf_dir!r} is not a folder with a config.json")


def exit_with_parent(pid: int, interval_s: float = 1.0) -> threading.Thread:
    """Exit this process once ``pid`` (the trainer that launched it) is gone: a trainer
    killed with SIGKILL, or ended by os._exit, leaves no server behind."""

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # alive, another user's (pid reused): keep serving
                pass

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    import socket

    from megatron_paced.config import add_flags, from_args
    from megatron_paced.models.config import ModelConfig, resolve_model_config

    parser = argparse.ArgumentParser(prog="python -m megatron_paced.rollout.serve",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once serving")
    parser.add_argument("--api-key-file", help="a file holding the key (or set "
                        f"${API_KEY_ENV}); without a key weight updates are off and only "
                        "loopback binds are allowed")
    parser.add_argument("--api-key", help="the key on the command line (visible in ps; prefer "
                        f"--api-key-file or ${API_KEY_ENV})")
    parser.add_argument("--allowed-peers", nargs="*", default=[],
                        help="addresses besides loopback that /init_weights_update_group may "
                             "name as master_address")
    parser.add_argument("--model", help="a preset (see megatron_paced.models.config.PRESETS)")
    parser.add_argument("--hf-config", help="HF config.json (or its folder) of the model")
    parser.add_argument("--hf-dir", help="HF folder to load weights from (config.json + "
                                         "*.safetensors)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of random weights")
    parser.add_argument("--max-sequence-length", type=int, default=2048)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--enable-deterministic-inference", action="store_true",
                        help="honour sampling_params.sampling_seed (as SGLang's flag: the n "
                             "copies of a prompt then share it); without it seeds are ignored")
    parser.add_argument("--weight-update-session", choices=["required", "none"],
                        default="required",
                        help="required: tensor and distributed updates only between "
                             "/begin_weight_update and /end_weight_update (SGLang 0.5.21-"
                             "0.5.23); none: a server without those endpoints (404)")
    parser.add_argument("--base-gpu-id", type=int, default=0,
                        help="the GPU this server uses (SGLang's flag; ignored on the CPU)")
    parser.add_argument("--debug-generate-delay", type=float, default=0.0,
                        help="seconds each /generate waits before generating (a slow server, "
                             "for tests of asynchronous rollouts)")
    parser.add_argument("--debug-weight-version-lag", type=int, default=0,
                        help="tag generations as this many weight versions older than they "
                             "are (fault injection: samples past a trainer's staleness bound)")
    defaults = ServerLimits()
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20,
                        help="largest request body")
    parser.add_argument("--max-n", type=int, default=defaults.max_n,
                        help="largest sampling_params.n")
    parser.add_argument("--max-prompts-per-request", type=int,
                        default=defaults.max_prompts_per_request)
    parser.add_argument("--max-total-tokens", type=int, default=defaults.max_total_tokens,
                        help="per request: prompts x n x (prompt + max_new_tokens)")
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers,
                        help="requests served at once (more get 503)")
    parser.add_argument("--socket-timeout", type=float, default=defaults.socket_timeout_s,
                        help="seconds a connection may stall")
    parser.add_argument("--update-group-timeout", type=float,
                        default=defaults.update_group_timeout_s,
                        help="seconds /init_weights_update_group waits for its peers")
    add_flags(parser, ModelConfig, "model (when neither --model nor --hf-config is given)")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    try:
        _startup_checks(args)
        api_key = read_api_key(args)
    except ConfigError as err:
        return fail(str(err))
    try:
        address = ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            return fail(f"--host {args.host!r} is not an IP address (or localhost)")
        address = ipaddress.ip_address("127.0.0.1")
    if not address.is_loopback and not api_key:
        return fail(f"--host {args.host} is not a loopback address: give the server a key "
                    f"(${API_KEY_ENV} or --api-key-file) so that callers are authenticated")
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_n=args.max_n,
                          max_prompts_per_request=args.max_prompts_per_request,
                          max_total_tokens=args.max_total_tokens, max_workers=args.max_workers,
                          socket_timeout_s=args.socket_timeout,
                          update_group_timeout_s=args.update_group_timeout)
    try:
        model_cfg = resolve_model_config(args.model, args.hf_config or args.hf_dir,
                                         from_args(ModelConfig, args))
        model_cfg.validate()
    except ConfigError as err:
        return fail(str(err))

    class Server(BoundedHTTPServer):
        address_family = socket.AF_INET6 if address.version == 6 else socket.AF_INET

    try:  # bind before the model is built: a port in use fails at once
        server = Server((str(address), args.port), BaseHTTPRequestHandler, limits.max_workers)
    except OSError as err:
        return fail(f"--host {args.host} --port {args.port}: cannot bind ({err.strerror})")
    if os.environ.get(PARENT_PID_ENV, "").isdigit():
        exit_with_parent(int(os.environ[PARENT_PID_ENV]))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    service = RolloutService(model_cfg, seed=args.seed, hf_dir=args.hf_dir,
                             max_sequence_length=args.max_sequence_length,
                             max_batch_size=args.max_batch_size, limits=limits,
                             allowed_peers=tuple(args.allowed_peers),
                             generate_delay_s=args.debug_generate_delay,
                             weight_version_lag=args.debug_weight_version_lag,
                             deterministic=args.enable_deterministic_inference,
                             weight_update_session=args.weight_update_session == "required",
                             base_gpu_id=args.base_gpu_id)
    server.RequestHandlerClass = make_handler(service, api_key)
    port = server.server_address[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    host = f"[{args.host}]" if address.version == 6 else args.host
    print(f"megatron-paced rollout server on http://{host}:{port}"
          + ("" if api_key else " (no key: weight updates off)"), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
