"""A rollout server with SGLang's native HTTP endpoints, backed by the embedded engine.

It lets the SGLang client, the weight sync and the fault handling run against a real process
on any machine (SGLang itself needs CUDA). Requests and answers follow SGLang's schema
(``sglang/srt/managers/io_struct.py``); token ids, or ``text`` where the server has a
tokenizer (``--tokenizer``, or the one in ``--hf-dir``), tokenized and decoded as SGLang's
tokenizer manager does:

    GET  /health, /health_generate, /model_info (and the deprecated /get_model_info)
    POST /generate                     input_ids or text (one or a batch), sampling_params
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

import ipaddress
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import torch

from megatron_paced.config import FlagParser, description
from megatron_paced.config import ConfigError, add_flags, from_args
from megatron_paced.models.config import ModelConfig, resolve_model_config
from megatron_paced.rollout.http_api import (
    API_KEY_ENV,
    PARENT_PID_ENV,
    BoundedHTTPServer,
    make_handler,
)
from megatron_paced.rollout.requests import ServerLimits
from megatron_paced.rollout.service import RolloutService

__all__ = ["API_KEY_ENV", "PARENT_PID_ENV", "main"]


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


def load_tokenizer(folder: str | None, hf_dir: str | None, vocab_size: int):
    """The HF tokenizer of ``--tokenizer`` (or of ``--hf-dir`` when it holds one), or None; a
    ConfigError naming the flag when it cannot be read or does not fit the model."""
    flag = "--tokenizer"
    if folder is None and hf_dir and any(os.path.isfile(os.path.join(hf_dir, name)) for name
                                         in ("tokenizer.json", "tokenizer_config.json")):
        folder, flag = hf_dir, "--hf-dir"
    if folder is None:
        return None
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {folder!r}: no such folder")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag} {folder!r}: not a tokenizer transformers can load "
                          f"({str(err).splitlines()[0][:200]})") from None
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"{flag} {folder!r} has {len(tokenizer)} tokens but the model's "
                          f"vocabulary is {vocab_size}")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    import socket

    parser = FlagParser(prog="python -m megatron_paced.rollout.serve",
                                     description=description(__doc__))
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
    parser.add_argument("--tokenizer", help="HF tokenizer folder: serve \"text\" prompts and "
                                            "decode outputs' \"text\", as SGLang does "
                                            "(default: the one in --hf-dir, if any)")
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

    try:
        tokenizer = load_tokenizer(args.tokenizer, args.hf_dir, model_cfg.vocab_size)
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
                             base_gpu_id=args.base_gpu_id, tokenizer=tokenizer)
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
