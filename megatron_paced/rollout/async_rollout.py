"""Asynchronous rollouts with bounded staleness (``--max-staleness K``, K >= 1, on SGLang
servers or the project's rollout server): generation for the next K steps runs in a
background thread while the trainer trains, in an order that fixes which weights generate
what, so that a run repeats bit for bit whatever the timing.

The contract, with :class:`~megatron_paced.rl.collect.Collector`'s schedule (step j's
rollouts are submitted at the start of step j - K with ``min_version = j - K - 1``): a
generation waits until the servers hold at least ``min_version``; the weights of step s
(pushed after its optimizer step) are applied only after every generation submitted before
them, on every generating rank, has finished. So step j trains on samples of weights
version j - K - 1 exactly: staleness K = (j - 1) - (j - K - 1), pi_old being version j - 1.

Each generating rank (TP rank 0, PP rank 0 of each DP replica) runs one worker thread over a
FIFO of operations; global rank 0 also applies the pushes::

    generate(prompts, n, seed, min_version)   wait for the version, POST /generate (retried)
    push(prepared weights)     [rank 0]       wait for the generations each rank submitted
                                              before it (their counts, in the store), then
                                              /pause_generation -> update -> /flush_cache
                                              (retried while requests run) -> check
                                              weight_version -> /continue_generation

The ranks meet through counters in the job's c10d store, never through a collective in a
thread. A server that dies mid-flight is restarted, given the last applied weights again
(:meth:`~megatron_paced.rollout.weight_sync._Transport.replay_last`) and asked again with
the same seed: nothing is lost or duplicated. The trainer's collectives (gathering the
weights over TP) stay on its main thread, in :meth:`sync_weights`.

Usage::

    client = SGLangClient(urls, on_restart=lambda server: backend.on_server_restart(server))
    transport = TensorTransport(client, model_cfg, ctx, keep_last=True)
    backend = AsyncSGLangBackend(client, transport, ctx, timeout_s=600)
    handle = backend.submit(prompts, n=8, sampling=sampling, seed=step + 1, min_version=step - 1)
    backend.sync_weights(policy.modules(), version=step)   # collective; applied in order
    completions = handle.result()                          # each tagged with weight_version
    backend.drain()                                        # before a checkpoint
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
import urllib.error
from concurrent.futures import Future
from dataclasses import dataclass

import torch.distributed as dist

from megatron_paced.rollout.sglang_backend import SGLangBackend
from megatron_paced.rollout.sglang_client import RolloutError, ServerProcess

POLL_S = 0.002


@dataclass
class _Generate:
    prompts: list
    n: int
    sampling: object
    seed: int
    min_version: int
    future: Future


@dataclass
class _Push:
    prepared: object
    future: Future


@dataclass
class _Barrier:
    future: Future


class AsyncSGLangBackend(SGLangBackend):
    """:class:`~megatron_paced.rollout.sglang_backend.SGLangBackend` whose requests run in a
    worker thread, ordered against the weight pushes as the module docstring says."""

    def __init__(self, client, transport, ctx, *, timeout_s: float) -> None:
        from torch.distributed import distributed_c10d as c10d

        if not transport.keep_last:
            raise ValueError("asynchronous rollouts need a transport built with keep_last=True "
                             "(a restarted server is given the last push again)")
        super().__init__(client, transport)
        self.ctx, self.timeout_s = ctx, timeout_s
        self.is_generator = ctx.tp_rank == 0 and ctx.pp_rank == 0
        self.is_pusher = dist.get_rank() == 0
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, self.is_generator)
        self.generators = [rank for rank, flag in enumerate(flags) if flag]
        names = [secrets.token_hex(6)]
        dist.broadcast_object_list(names, src=0)
        self.prefix = f"paced-rollout-{names[0]}"
        self.store = c10d._get_default_store()
        self.num_submitted = 0
        self.latest_version: int | None = None
        self.first_version: int | None = None  # the run's first push (its start or resume)
        self.applied_version: int | None = None  # rank 0: the version the servers hold
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue()
        self.worker = None
        if self.is_generator or self.is_pusher:
            self.worker = threading.Thread(target=self._run, name="paced-rollout",
                                           daemon=True)
            self.worker.start()

    # ---- the trainer's side (main thread) -------------------------------------------------
    def submit(self, prompts: list[list[int]], n: int, sampling, seed: int,
               min_version: int | None = None) -> Future:
        """Queue a generation on weights of version >= ``min_version`` (default: the latest
        pushed); its future gives the completions."""
        if min_version is None:
            min_version = self.latest_version if self.latest_version is not None else 0
        # Never before the run's first push: a server holds no weights of this run until then.
        min_version = max(min_version, self.first_version if self.first_version is not None
                          else 0)
        future: Future = Future()
        self.num_submitted += 1
        self.queue.put(_Generate(prompts, n, sampling, seed, min_version, future))
        return future

    def generate(self, prompts: list[list[int]], n: int, sampling, seed: int) -> list[list]:
        """On the latest pushed weights (after the generations queued before)."""
        return self.submit(prompts, n, sampling, seed).result()

    def sync_weights(self, model, version: int) -> None:
        """Gather the weights (collective) and queue their push behind the generations
        submitted so far; returns without waiting for it."""
        prepared = self.transport.prepare(model[0], str(version))
        self.latest_version = int(version)
        if self.first_version is None:
            self.first_version = int(version)
        self.transport.version = str(version)
        if self.is_generator:  # what the push must wait for on this rank (counts may differ:
            # a rank that generates a stale group again submits once more)
            self.store.set(self._key(f"before/{version}/{dist.get_rank()}"),
                           str(self.num_submitted))
        if self.is_pusher:
            self.queue.put(_Push(prepared, Future()))

    def drain(self) -> None:
        """Wait until every queued operation on this rank has run (raises its error)."""
        if self.worker is None:
            return
        future: Future = Future()
        self.queue.put(_Barrier(future))
        future.result()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the worker thread after what is queued (the servers keep running)."""
        if self.worker is not None:
            self.queue.put(None)
            self.worker.join(timeout=self.timeout_s)
            self.worker = None

    def on_server_restart(self, server) -> None:
        """From the worker thread that found ``server`` dead: the last applied push again."""
        self.transport.replay_last(server)

    def close(self) -> None:
        self.stop()
        super().close()

    # ---- the worker thread ----------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _run(self) -> None:
        while True:
            op = self.queue.get()
            if op is None:
                return
            if self.error is not None:
                op.future.set_exception(self.error)
                continue
            try:
                op.future.set_result(self._execute(op))
            except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread
                self.error = err
                self.store.set(self._key("failed"), f"rank {dist.get_rank()}: {err}"[:500])
                op.future.set_exception(err)

    def _execute(self, op):
        if isinstance(op, _Barrier):
            return None
        if isinstance(op, _Generate):
            self._wait(lambda: self._applied() >= op.min_version,
                       f"the servers to hold the weights of step {op.min_version}")
            completions = self.client.generate(op.prompts, op.n, op.sampling, op.seed)
            self.store.add(self._key(f"generated/{dist.get_rank()}"), 1)
            return completions
        version = op.prepared.version
        self._wait(lambda: all(self._finished_before(version, rank) for rank in self.generators),
                   f"the generations before the push of step {version}")
        for attempt in range(self.client.max_retries + 1):
            try:
                self._push(op.prepared)
                break
            except OSError as err:  # urllib's errors too; a refusal (4xx) is final
                refused = isinstance(err, urllib.error.HTTPError) and err.code < 500
                if refused or attempt == self.client.max_retries or not self._restart_dead():
                    raise
        self.applied_version = int(op.prepared.version)
        self.store.set(self._key("applied"), op.prepared.version)
        return None

    def _finished_before(self, version: str, rank: int) -> bool:
        """Whether ``rank`` finished every generation it submitted before this push."""
        before = self._key(f"before/{version}/{rank}")
        if not self.store.check([before]):
            return False
        return self.store.add(self._key(f"generated/{rank}"), 0) >= int(self.store.get(before))

    def _push(self, prepared) -> None:
        servers = self.client.servers
        try:
            for server in servers:  # SGLang 0.5: pause -> update -> flush -> continue
                self.client.post(server, "/pause_generation", {"mode": "retract"})
            self.transport.apply_in_session(prepared, servers)
            self.transport.finish(prepared.version, servers)
        finally:  # a failed push must not leave --sglang-url servers paused for good
            for server in servers:
                try:
                    self.client.post(server, "/continue_generation", {})
                except OSError:  # a dead server: restarted (unpaused) by the retry
                    pass

    def _restart_dead(self) -> bool:
        """Restart the servers this rank launched that died; True if one was."""

        restarted = [s for s in self.client.servers
                     if isinstance(s, ServerProcess) and s.restart_if_dead()]
        if restarted:
            self.transport.forget_servers()
            for server in restarted:
                self.client.forget_server_info(server)
        return bool(restarted)

    def _applied(self) -> int:
        if self.is_pusher:
            return -1 if self.applied_version is None else self.applied_version
        key = self._key("applied")
        return int(self.store.get(key)) if self.store.check([key]) else -1

    def _wait(self, done, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        failed = self._key("failed")
        while not done():
            if self.store.check([failed]):
                raise RolloutError(f"asynchronous rollouts stopped: "
                                   f"{self.store.get(failed).decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise RolloutError(f"waited {self.timeout_s:.0f} s (--rollout-timeout) for "
                                   f"{what}")
            time.sleep(POLL_S)
