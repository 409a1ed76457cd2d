"""A rollout server with SGLang's native HTTP endpoints, backed by the embedded engine.

It lets the SGLang client, the weight sync and the fault handling run against a real process
on any machine (SGLang itself needs CUDA). Requests and answers follow SGLang's schema
(``sglang/srt/managers/io_struct.py``); token ids only (no server-side tokenizer):

    GET  /health, /health_generate, /get_model_info
    POST /generate                     input_ids (one list or a batch), sampling_params
                                       (with ``n``), return_logprob, rid; answers in
                                       SGLang's order (the batch repeated n times)
    POST /update_weights_from_disk     {"model_path": HF safetensors folder, "weight_version"}
    POST /update_weights_from_tensor   {"serialized_named_tensors": [base64 of a pickled
                                       [(hf_name, tensor), ...] in shared memory], ...}
    POST /init_weights_update_group    join a weight-update group (gloo on the CPU, nccl on a
                                       GPU) as rank ``rank_offset``
    POST /update_weights_from_distributed  {"names", "dtypes", "shapes", "group_name", ...}:
                                       receive each tensor by broadcast from rank 0, then load
    POST /destroy_weights_update_group
    GET  /get_server_info              {"tp_size": 1, ...}
    POST /update_weight_version, /flush_cache, /release_memory_occupation,
         /resume_memory_occupation

It binds to 127.0.0.1 unless told otherwise; bound elsewhere it refuses to start without
``--api-key``, which weight updates must then present (``Authorization: Bearer KEY``). Model
calls are serialized by one lock, so a weight update never interleaves with a generation.

Usage::

    python -m megatron_paced.rollout.serve --model tiny-llama --seed 1234 --port 30000
    python -m megatron_paced.rollout.serve --hf-dir ckpt/ --port 0 --port-file port.txt
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist

from megatron_paced.config import ConfigError
from megatron_paced.utils import free_port

WEIGHT_ENDPOINTS = {"/update_weights_from_disk", "/update_weights_from_tensor",
                    "/update_weight_version", "/release_memory_occupation",
                    "/resume_memory_occupation", "/init_weights_update_group",
                    "/update_weights_from_distributed", "/destroy_weights_update_group"}


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RolloutService:
    """The model, its engine and the state the endpoints share."""

    def __init__(self, model_cfg, *, seed: int, hf_dir: str | None, max_sequence_length: int,
                 max_batch_size: int) -> None:
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
        self.ctx = initialize_parallel(ParallelConfig(), seed=seed)
        self.model_cfg = model_cfg
        self.model = build_gpt_model(model_cfg, self.ctx, seed=seed)
        self.engine = EmbeddedEngine([self.model], self.ctx, vocab_size=model_cfg.vocab_size,
                                     max_sequence_length=max_sequence_length,
                                     max_batch_size=max_batch_size)
        self.model_path = hf_dir or f"random-init(seed={seed})"
        self.weight_version = "default"
        self.released = False
        self.lock = threading.Lock()
        self.num_requests = 0
        self.update_groups: dict[str, tuple[object, str]] = {}  # name -> (group, backend)
        if hf_dir:
            self.load_hf_dir(hf_dir)

    # ---- weights ---------------------------------------------------------------------------
    def load_hf_tensors(self, hf: dict[str, torch.Tensor], *, complete: bool) -> int:
        from megatron_paced.models.hf_mapping import hf_to_megatron
        from megatron_paced.models.sharding import load_full_params_

        full = hf_to_megatron(hf, self.model_cfg, complete=complete,
                              padded_vocab_size=self.model_cfg.padded_vocab_size(1))
        return len(load_full_params_(self.model, full, tp_rank=0, tp_size=1, strict=complete))

    def load_hf_dir(self, path: str) -> int:
        from safetensors.torch import load_file

        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise RequestError(400, f"model_path {path!r} holds no .safetensors file")
        hf: dict[str, torch.Tensor] = {}
        for name in files:
            hf.update(load_file(os.path.join(path, name)))
        return self.load_hf_tensors(hf, complete=True)

    # ---- endpoints ---------------------------------------------------------------------------
    def generate(self, body: dict):
        from megatron_paced.rollout.engine import SamplingParams

        input_ids = body.get("input_ids")
        if input_ids is None:
            raise RequestError(400, "this server needs input_ids (it has no tokenizer for text)")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        prompts = [input_ids] if single else input_ids
        if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
                                  for p in prompts):
            raise RequestError(400, "input_ids must be a non-empty list of token ids, or a "
                                    "list of such lists")
        params = body.get("sampling_params") or {}
        if isinstance(params, list):
            if any(p != params[0] for p in params):
                raise RequestError(400, "per-prompt sampling_params must be identical here")
            params = params[0]
        params = dict(params)
        n = int(params.pop("n", 1))
        seed = params.pop("sampling_seed", None)
        known = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids"}
        sampling = SamplingParams(**{k: v for k, v in params.items() if k in known})
        try:
            sampling.validate()
        except ConfigError as err:
            raise RequestError(400, f"sampling_params: {err}") from None
        if self.released:
            raise RequestError(400, "memory is released; call /resume_memory_occupation")
        with self.lock:
            self.num_requests += 1
            if seed is None:
                seed = self.num_requests
            completions = self.engine.generate(prompts, n, sampling, seed=int(seed))
            version = self.weight_version
        rids = body.get("rid")
        outputs = []
        for sample in range(n):  # SGLang's order: the whole batch, n times
            for index, per_prompt in enumerate(completions):
                c = per_prompt[sample]
                position = sample * len(prompts) + index
                rid = rids[position] if isinstance(rids, list) else (rids or f"req-{position}")
                finish = ({"type": "stop", "matched": c.token_ids[-1]}
                          if c.finish_reason == "stop" else
                          {"type": "length", "length": len(c.token_ids)})
                meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompts[index]),
                        "completion_tokens": len(c.token_ids), "cached_tokens": 0,
                        "weight_version": version}
                if body.get("return_logprob"):
                    meta["output_token_logprobs"] = [[lp, t, None]
                                                     for lp, t in zip(c.log_probs, c.token_ids)]
                outputs.append({"text": "", "output_ids": c.token_ids, "meta_info": meta})
        return outputs[0] if single and n == 1 else outputs

    def update_weights_from_disk(self, body: dict):
        path = body.get("model_path")
        if not path or not os.path.isdir(path):
            raise RequestError(400, f"model_path {path!r} is not a folder")
        with self.lock:
            count = self.load_hf_dir(path)
            self._set_version(body)
            self.model_path = path
        return {"success": True, "message": f"loaded {count} parameters from {path}",
                "num_paused_requests": 0}

    def update_weights_from_tensor(self, body: dict):
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing as torch_mp

        torch_mp.set_sharing_strategy("file_system")
        serialized = body.get("serialized_named_tensors")
        if not isinstance(serialized, list) or not serialized:
            raise RequestError(400, "serialized_named_tensors must be a non-empty list")
        if body.get("load_format") not in (None, "direct"):
            raise RequestError(400, f"load_format {body['load_format']!r} is not supported")
        named = ForkingPickler.loads(base64.b64decode(serialized[0]))
        hf = {name: tensor.clone() for name, tensor in named}
        with self.lock:
            count = self.load_hf_tensors(hf, complete=False)
            self._set_version(body)
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
        if name in self.update_groups:  # formed again (a trainer or server restarted)
            close_update_group(self.update_groups.pop(name)[0])
        group = open_update_group(backend, body["master_address"], int(body["master_port"]),
                                  int(body["rank_offset"]), int(body["world_size"]), name)
        self.update_groups[name] = (group, backend)
        return {"success": True, "message": f"joined {name} as rank {body['rank_offset']} of "
                                            f"{body['world_size']}"}

    def update_weights_from_distributed(self, body: dict):
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
        if not all(isinstance(k, torch.dtype) for k in kinds):
            raise RequestError(400, f"dtypes {dtypes!r}: not all are torch dtypes")
        device = torch.device("cpu") if backend == "gloo" else self.ctx.device
        received = {}
        for tensor_name, kind, shape in zip(names, kinds, shapes):
            tensor = torch.empty(shape, dtype=kind, device=device)
            dist.broadcast(tensor, group=group, group_src=0)
            received[tensor_name] = tensor
        with self.lock:
            count = self.load_hf_tensors(received, complete=False)
            self._set_version(body)
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
        return {"tp_size": 1, "dp_size": 1, "model_path": self.model_path,
                "weight_version": self.weight_version}

    def _set_version(self, body: dict) -> None:
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])

    def update_weight_version(self, body: dict):
        if "new_version" not in body:
            raise RequestError(400, "new_version is required")
        self.weight_version = str(body["new_version"])
        return {"success": True, "message": f"Weight version updated to {self.weight_version}",
                "new_version": self.weight_version}

    def model_info(self):
        return {"model_path": self.model_path, "weight_version": self.weight_version,
                "is_generation": True, "architecture": self.model_cfg.architecture}


def make_handler(service: RolloutService, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, payload=None) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if not length:
                return {}
            try:
                body = json.loads(self.rfile.read(length))
            except json.JSONDecodeError as err:
                raise RequestError(400, f"body is not JSON: {err.msg}") from None
            if not isinstance(body, dict):
                raise RequestError(400, "body must be a JSON object")
            return body

        def _authorized(self) -> bool:
            return api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}"

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

        def _route(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                body = self._body()
                if path in WEIGHT_ENDPOINTS and not self._authorized():
                    raise RequestError(401, "weight updates need Authorization: Bearer <api key>")
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
                }
                if path in routes:
                    return self._reply(200, routes[path](body))
                if path in ("/get_model_info", "/model_info"):
                    return self._reply(200, service.model_info())
                if path == "/get_server_info":
                    return self._reply(200, service.server_info())
                if path == "/flush_cache":  # the embedded engine keeps no prefix cache
                    return self._reply(200, {"success": True})
                if path == "/release_memory_occupation":
                    service.released = True
                    return self._reply(200, {})
                if path == "/resume_memory_occupation":
                    service.released = False
                    return self._reply(200, {})
                raise RequestError(404, f"no endpoint {path}")
            except RequestError as err:
                self._reply(err.status, {"error": {"message": str(err), "code": err.status}})
            except Exception as err:  # noqa: BLE001 - report, keep serving
                self._reply(500, {"error": {"message": f"{type(err).__name__}: {err}",
                                            "code": 500}})

    return Handler


def main(argv: list[str] | None = None) -> int:
    from megatron_paced.config import add_flags, from_args
    from megatron_paced.models.config import ModelConfig, resolve_model_config

    parser = argparse.ArgumentParser(prog="python -m megatron_paced.rollout.serve",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once serving")
    parser.add_argument("--api-key", help="required for weight updates; required to bind "
                                          "to a non-loopback address")
    parser.add_argument("--model", help="a preset (see megatron_paced.models.config.PRESETS)")
    parser.add_argument("--hf-config", help="HF config.json (or its folder) of the model")
    parser.add_argument("--hf-dir", help="HF folder to load weights from (config.json + "
                                         "*.safetensors)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of random weights")
    parser.add_argument("--max-sequence-length", type=int, default=2048)
    parser.add_argument("--max-batch-size", type=int, default=64)
    add_flags(parser, ModelConfig, "model (when neither --model nor --hf-config is given)")
    args = parser.parse_args(argv)
    try:
        is_loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback and not args.api_key:
        print(f"{parser.prog}: error: --host {args.host} is not a loopback address: pass "
              "--api-key so that weight updates are authenticated", file=sys.stderr)
        return 2
    try:
        model_cfg = resolve_model_config(args.model, args.hf_config or args.hf_dir,
                                         from_args(ModelConfig, args))
        model_cfg.validate()
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    service = RolloutService(model_cfg, seed=args.seed, hf_dir=args.hf_dir,
                             max_sequence_length=args.max_sequence_length,
                             max_batch_size=args.max_batch_size)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(service, args.api_key))
    port = server.server_address[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(f"megatron-paced rollout server on http://{args.host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
