"""The rollout interface the trainer uses (:class:`RolloutBackend`), its flags
(:class:`RolloutConfig`), the SGLang backend, and :func:`build_rollout`, which turns the
flags into a backend: the trainer never checks which one it holds.

Usage::

    rollout = build_rollout(cfg, model=policy.modules(), model_cfg=model_cfg, ctx=ctx,
                            max_sequence_length=4096, log_dir=save_dir)
    if not rollout.asked_once_per_replica or (ctx.tp_rank == 0 and ctx.pp_rank == 0):
        completions = rollout.generate(prompt_tokens, n=8, sampling=sampling, seed=step)
    rollout.sync_weights(policy.modules(), version=step)   # after each optimizer step

With ``--max-staleness K >= 1`` the SGLang backend is asynchronous
(:mod:`megatron_paced.rollout.async_rollout`): ``submit`` queues a generation and returns a
future, ``sync_weights`` queues the push behind it.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_paced.config import require
from megatron_paced.rollout.async_rollout import AsyncSGLangBackend
from megatron_paced.rollout.engine import EmbeddedEngine
from megatron_paced.rollout.http_api import API_KEY_ENV
from megatron_paced.rollout.sglang_backend import SGLangBackend
from megatron_paced.rollout.sglang_client import ServerProcess, SGLangClient
from megatron_paced.rollout.update_group import DistributedTransport
from megatron_paced.rollout.weight_sync import (
    DiskTransport,
    TensorTransport,
    shared_staging_directory,
)


@dataclass
class RolloutConfig:
    """Where completions come from."""

    rollout_backend: Literal["embedded", "sglang"] = "embedded"
    """embedded: KV-cached sampling on the trainer's own model (CPU or GPU, PP1); sglang:
    SGLang servers, launched here or attached by --sglang-url."""
    sglang_url: list[str] = field(default_factory=list)
    """URLs of running servers to attach to (no launch)."""
    sglang_launch_command: str = "python -m sglang.launch_server"
    """Command that starts one server; --host/--port/--api-key are appended."""
    sglang_server_args: str = ""
    """Arguments passed through to each launched server (e.g. "--model-path X --tp 2")."""
    sglang_num_servers: int = 1
    """Servers to launch (one per node or GPU group)."""
    sglang_base_port: int = 30000
    """Port of the first launched server; server i of node k listens on base + k *
    --sglang-num-servers + i."""
    sglang_api_key: Optional[str] = None
    """The servers' key (default: $MEGATRON_PACED_API_KEY, else one generated per run for the
    servers the trainer launches, handed to them through the environment)."""
    sglang_original_logprobs: bool = False
    """The --sglang-url servers run with SGLANG_RETURN_ORIGINAL_LOGPROB=1, so their log-probs
    are of the temperature-1 policy (SGLang otherwise returns those of the temperature-scaled
    logits). Servers the trainer launches always get it; attached ones must say so before
    their log-probs anchor a loss at --temperature != 1."""
    max_staleness: int = 0
    """Asynchronous rollouts: step j trains on samples of the weights after step j - K - 1
    (staleness K), generated while the K steps before it train (0: generate, then train).
    SGLang servers generate in the background; the embedded engine generates K steps
    ahead on the trainer's own cores (the same samples' staleness, no overlap)."""
    rollout_concurrency: int = 8
    """Requests in flight at once."""
    rollout_prompts_per_request: int = 32
    """Prompts per /generate request."""
    rollout_timeout: float = 600.0
    """Seconds one request may take."""
    rollout_max_retries: int = 3
    """Retries of a failed request (restarting a dead launched server first)."""
    weight_sync: Literal["tensor", "disk", "nccl"] = "tensor"
    """How weights reach SGLang: tensor (colocated, /update_weights_from_tensor), disk
    (/update_weights_from_disk), nccl (disaggregated: a broadcast over a weight-update group,
    /update_weights_from_distributed; gloo on a CPU run)."""
    weight_sync_dir: Optional[str] = None
    """Folder under which --weight-sync disk stages each version (default: the temporary
    folder of rank 0's node; with several nodes, one on a file system every node shares)."""
    weight_sync_bucket_mb: int = 256
    """Size bound of one weight-sync bucket."""
    weight_sync_master_address: Optional[str] = None
    """Address the servers reach this trainer at for --weight-sync nccl (default: 127.0.0.1
    when every server is local, else this node's host name)."""
    weight_sync_master_port: int = 0
    """Port of the weight-update group's store, + the pipeline stage (0: a free port)."""

    def validate(self) -> None:
        if self.rollout_backend == "sglang":
            require(self.sglang_num_servers >= 1 or bool(self.sglang_url), "sglang_num_servers",
                    self.sglang_num_servers, "must be >= 1 (or pass --sglang-url)")
            num_nodes = node_count()
            require(self.weight_sync != "tensor" or num_nodes == 1, "weight_sync", "tensor",
                    f"with {num_nodes} nodes: CUDA IPC reaches only the servers of the pushing "
                    "node; use disk (with --weight-sync-dir on a shared file system) or nccl")
            require(self.weight_sync != "disk" or num_nodes == 1 or bool(self.weight_sync_dir),
                    "weight_sync", "disk", f"with {num_nodes} nodes needs --weight-sync-dir on "
                    "a file system every node and server shares")
        require(0 <= self.weight_sync_master_port < 65536, "weight_sync_master_port",
                self.weight_sync_master_port, "must be a port number (0: a free one)")
        require(self.rollout_concurrency >= 1, "rollout_concurrency", self.rollout_concurrency,
                "must be >= 1")
        require(self.rollout_prompts_per_request >= 1, "rollout_prompts_per_request",
                self.rollout_prompts_per_request, "must be >= 1")
        require(self.max_staleness >= 0, "max_staleness", self.max_staleness, "must be >= 0")
        require(self.rollout_max_retries >= 0, "rollout_max_retries", self.rollout_max_retries,
                "must be >= 0")


class RolloutBackend(Protocol):
    """What the trainer asks of a generation backend."""

    asked_once_per_replica: bool
    """True: only the first rank of a model replica (TP rank 0, PP rank 0) calls
    :meth:`generate` and the trainer broadcasts the answer over the replica (SGLang servers);
    False: every rank of the replica calls it (the embedded engine's TP ranks cooperate)."""

    def submit(self, prompts: list[list[int]], n: int, sampling, seed: int,
               min_version: int | None = None):
        """A future of :meth:`generate`'s answer, generated on weights of version >=
        ``min_version`` (asynchronous backends run it in the background)."""

    def drain(self) -> None:
        """Wait for everything submitted (before a checkpoint)."""

    def generate(self, prompts: list[list[int]], n: int, sampling, seed: int) -> list[list]:
        """``n`` completions (:class:`~megatron_paced.rollout.engine.Completion`) of each
        prompt, sampled with ``sampling``; the same seed gives the same samples."""

    def sync_weights(self, model: list[torch.nn.Module], version: int) -> None:
        """Make the backend generate from ``model`` (this rank's policy stages) from now on,
        tagged ``version`` (the trainer's step)."""

    def kill_first_server(self) -> None:
        """Fault injection (--kill-rollout-server-after-step): SIGKILL one server this
        process launched (nothing where there is none)."""

    def close(self) -> None:
        """The end of the run: stop what the backend launched, remove what it staged."""


def run_api_key(cfg: RolloutConfig) -> str | None:
    """The key of this run's servers, the same on every rank: --sglang-api-key, else
    $MEGATRON_PACED_API_KEY, else (servers the trainer launches) a fresh random key from
    rank 0. None for --sglang-url servers without a key."""
    import secrets

    key = cfg.sglang_api_key or os.environ.get(API_KEY_ENV)
    if key or cfg.sglang_url:
        return key
    keys = [secrets.token_urlsafe(32)]
    if dist.is_initialized():
        dist.broadcast_object_list(keys, src=0)
    return keys[0]


def build_rollout(cfg: RolloutConfig, *, model, model_cfg, ctx, max_sequence_length: int,
                  log_dir: str | None = None) -> RolloutBackend:
    """The backend of this configuration."""

    cfg.validate()
    if cfg.rollout_backend == "embedded":
        return EmbeddedEngine(model, ctx, vocab_size=model_cfg.vocab_size,
                              max_sequence_length=max_sequence_length)

    servers: list = list(cfg.sglang_url)
    api_key = run_api_key(cfg)
    num_nodes = node_count()
    if not servers:
        servers = launch_servers(cfg, api_key=api_key, log_dir=log_dir, num_nodes=num_nodes)
    backend = None  # the client's restart hook reaches the backend built below
    client = SGLangClient(servers, concurrency=cfg.rollout_concurrency,
                          prompts_per_request=cfg.rollout_prompts_per_request,
                          timeout_s=cfg.rollout_timeout, max_retries=cfg.rollout_max_retries,
                          api_key=api_key, server_offset=ctx.dp_rank,
                          on_restart=lambda server: backend.on_server_restart(server))
    common = dict(bucket_bytes=cfg.weight_sync_bucket_mb << 20,
                  keep_last=bool(cfg.max_staleness))
    if cfg.weight_sync == "tensor":
        transport = TensorTransport(client, model_cfg, ctx, **common)
    elif cfg.weight_sync == "disk":
        transport = DiskTransport(client, model_cfg, ctx,
                                  directory=shared_staging_directory(cfg.weight_sync_dir),
                                  owns_parent=True, **common)
    else:
        transport = DistributedTransport(
            client, model_cfg, ctx, backend="nccl" if ctx.device.type == "cuda" else "gloo",
            master_address=cfg.weight_sync_master_address,
            master_port=cfg.weight_sync_master_port, **common)
    if cfg.max_staleness:
        backend = AsyncSGLangBackend(client, transport, ctx, timeout_s=cfg.rollout_timeout)
    else:
        backend = SGLangBackend(client, transport)
    return backend


def node_count() -> int:
    """Nodes of this torchrun job (its agents: ``GROUP_WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)


def server_gpu_count(server_args: list[str]) -> int:
    """The GPU ids one launched SGLang server spans: SGLang's ``compute_world_size``
    (``server_args.py``: (1 with --enable-dp-attention, else --dp-size) x --tp-size x
    --pp-size) times its --gpu-id-step (1 where unset)."""
    def value(*names: str) -> int:
        for index, arg in enumerate(server_args):
            for name in names:
                if arg == name and index + 1 < len(server_args):
                    return int(server_args[index + 1])
                if arg.startswith(name + "="):
                    return int(arg.split("=", 1)[1])
        return 1

    dp = 1 if "--enable-dp-attention" in server_args else \
        value("--dp-size", "--dp", "--data-parallel-size")
    return dp * value("--tp-size", "--tp", "--tensor-parallel-size") * \
        value("--pp-size", "--pp", "--pipeline-parallel-size") * value("--gpu-id-step")


def per_server_args(server_args: list[str], index: int) -> list[str]:
    """Server ``index``'s arguments on its node: its own GPUs (``--base-gpu-id``, counted
    from the one the user gave, else 0), so that N servers do not all land on GPUs
    0..tp-1."""
    args = list(server_args)
    base = 0
    for position, arg in enumerate(args):
        if arg == "--base-gpu-id" and position + 1 < len(args):
            base = int(args[position + 1])
            del args[position:position + 2]
            break
        if arg.startswith("--base-gpu-id="):
            base = int(arg.split("=", 1)[1])
            del args[position]
            break
    return args + ["--base-gpu-id", str(base + index * server_gpu_count(server_args))]


def launch_servers(cfg: RolloutConfig, *, api_key: str | None, log_dir: str | None,
                   num_nodes: int) -> list:
    """Start ``--sglang-num-servers`` servers on every node (by its first process) and return
    every node's servers, the same list on every rank (collective when distributed): this
    node's as :class:`ServerProcess` on the launching rank, URLs elsewhere. With several
    nodes the servers listen on all interfaces (with the run's key) and are named by host."""
    import socket

    command = shlex.split(cfg.sglang_launch_command)
    server_args = shlex.split(cfg.sglang_server_args)
    node_rank = int(os.environ.get("GROUP_RANK", "0") or 0)
    ports = [cfg.sglang_base_port + node_rank * cfg.sglang_num_servers + index
             for index in range(cfg.sglang_num_servers)]
    launcher = int(os.environ.get("LOCAL_RANK", "0")) == 0
    host = "127.0.0.1" if num_nodes == 1 else "0.0.0.0"
    advertised = "127.0.0.1" if num_nodes == 1 else socket.gethostname()
    if launcher and log_dir:
        os.makedirs(log_dir, exist_ok=True)
    launched = []
    for index, port in enumerate(ports if launcher else []):
        log = os.path.join(log_dir, f"sglang-{node_rank * len(ports) + index}.log") \
            if log_dir else None
        server = ServerProcess(command + per_server_args(server_args, index), host=host,
                               port=port, log_path=log, api_key=api_key)
        server.start()  # returns once /health answers
        launched.append(server)
    urls = [[f"http://{advertised}:{port}" for port in ports] if launcher else []]
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, urls[0])
        urls = gathered
    local = {f"http://{advertised}:{s.port}": s for s in launched}
    return [local.get(url, url) for node_urls in urls for url in node_urls]
