"""The SGLang backend: server processes we start (or attach to) and a client for /generate.

:class:`ServerProcess` starts ``python -m sglang.launch_server`` (or any command that serves
SGLang's native API, such as ``python -m megatron_paced.rollout.serve``) with the user's
arguments passed through plus ``--host``/``--port``, in an environment without the trainer's
torchrun variables (:func:`server_environment`), waits until ``/health`` answers, restarts it
when it dies, and stops it on exit.

:class:`SGLangClient` implements the rollout interface over HTTP, as SGLang 0.5.21-0.5.23
answer it (``sglang/srt/managers/io_struct.py``, ``managers/tokenizer_manager.py``,
``entrypoints/http_server.py``):

* A call to ``generate`` is cut into requests of ``prompts_per_request`` prompts: a batch of
  ``input_ids`` with ``sampling_params.n``, ``return_logprob`` and one ``rid`` per prompt
  (``GenerateReqInput._normalize_rid``: a list as long as the batch, else 400).
* SGLang answers prompt-major: output ``i * n + j`` is sample ``j`` of prompt ``i``
  (``TokenizerManager._handle_batch_request`` expands ``for i in batch: for _ in range(n)``);
  each output's ``meta_info.prompt_tokens`` is checked against its prompt's length.
* ``sampling_seed`` acts only on a server started with ``--enable-deterministic-inference``
  (``layers/sampler.py``), and there the ``n`` copies of a prompt share it, so they would all
  be the same. Against such a server (``/server_info`` says so) each (prompt, sample) is its
  own row with ``n = 1`` and its own seed; against any other, no seed is sent.
* ``meta_info.weight_versions`` (the spans of weights that sampled the tokens) gives
  the completion's version as the oldest span's; ``weight_version`` otherwise.

A request that fails (connection refused or reset, timeout, HTTP 5xx) is retried up to
``max_retries`` times; if its server process has died it is restarted first and
``on_restart(server)`` runs (the weight sync re-pushes the current weights there). Every
(prompt, sample) slot is filled exactly once or the call raises :class:`RolloutError` naming
what is missing: no prompt is lost or duplicated.

Usage::

    server = ServerProcess(["python", "-m", "sglang.launch_server", "--model-path", path,
                            "--tp", "2"], port=30000)
    server.start()
    client = SGLangClient([server], concurrency=8)
    out = client.generate(prompt_token_ids, n=8, sampling=SamplingParams(...), seed=step)
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from megatron_paced.rollout.engine import Completion, SamplingParams
from megatron_paced.rollout.http_api import API_KEY_ENV, PARENT_PID_ENV
from megatron_paced.utils import is_torchrun_variable

MAX_ABORTS_PER_REQUEST = 100  # then an aborted request counts as a failed attempt


class RolloutError(RuntimeError):
    """Generation could not be completed (after retries and restarts)."""


class AbortedRequest(RolloutError):
    """The server aborted the request (``/pause_generation`` in abort mode): it is sent
    again, with the same seed, once generation continues."""


def parse_weight_version(version) -> int | None:
    """The trainer step a server's ``weight_version`` names ("12" -> 12); None for a version
    this trainer did not push (e.g. SGLang's "default")."""
    text = str(version) if version is not None else ""
    return int(text) if text.lstrip("-").isdigit() and text.count("-") <= 1 else None


def oldest_weight_version(meta: dict) -> int | None:
    """The oldest weights that sampled a completion: SGLang (0.5.21 and 0.5.23) reports the
    spans of versions over its tokens (``meta_info.weight_versions``,
    ``utils/weight_versions.py``; ``weight_version`` is the last span's), a server without
    spans one ``weight_version``. Staleness counts from the oldest."""
    spans = meta.get("weight_versions") or []
    versions = [parse_weight_version(span.get("version")) for span in spans
                if isinstance(span, dict)]
    versions = [v for v in versions if v is not None]
    if versions:
        return min(versions)
    return parse_weight_version(meta.get("weight_version"))


def http_json(url: str, body: dict | None = None, *, timeout_s: float,
              api_key: str | None = None, method: str | None = None):
    """POST (or GET without a body) JSON; returns the decoded answer, or the text of an
    answer that is not JSON (SGLang's ``/flush_cache`` answers plain text), or raises on
    HTTP errors with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            content_type = response.headers.get("Content-Type") or ""
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise urllib.error.HTTPError(err.url, err.code, f"{err.reason}: {detail}", err.headers,
                                     None) from None
    if not raw:
        return None
    if "json" in content_type:
        return json.loads(raw)
    text = raw.decode(errors="replace")
    try:  # a JSON answer without its Content-Type
        return json.loads(text)
    except ValueError:
        return text


RETURN_ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"


def server_environment(base: dict[str, str], extra: dict[str, str] | None = None) -> dict:
    """The environment of a launched server: ``base`` without torchrun's variables
    (:func:`~megatron_paced.utils.is_torchrun_variable`), with
    ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (SGLang otherwise returns log-probs of the
    temperature-scaled logits, ``layers/sampler.py``; the trainer's pi_old is the policy at
    temperature 1), then ``extra`` (which may set any of them again on purpose)."""
    env = {name: value for name, value in base.items() if not is_torchrun_variable(name)}
    env[RETURN_ORIGINAL_LOGPROB_ENV] = "1"
    env.update(extra or {})
    return env


class ServerProcess:
    """One managed server process on ``host:port``."""

    def __init__(self, command: Sequence[str], *, host: str = "127.0.0.1", port: int = 30000,
                 startup_timeout_s: float = 600.0, log_path: str | None = None,
                 env: dict[str, str] | None = None, api_key: str | None = None) -> None:
        self.command = list(command)
        self.host, self.port = host, port
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self.env = env
        self.api_key = api_key
        self.process: subprocess.Popen | None = None
        self.num_restarts = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        command = self.command + ["--host", self.host, "--port", str(self.port)]
        env = server_environment(dict(os.environ), {**(self.env or {}),
                                                    PARENT_PID_ENV: str(os.getpid())})
        if self.api_key:
            # The key goes through the environment, never argv (visible in ps), except to
            # SGLang's own launcher, which reads it from argv only (docs/security.md).
            env[API_KEY_ENV] = self.api_key
            if any("sglang.launch_server" in part for part in command):
                command += ["--api-key", self.api_key]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        atexit.register(self.stop)  # never leave a server behind the trainer
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RolloutError(f"server {self.command[:4]}... exited with code "
                                   f"{self.process.returncode} while starting"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            if self.healthy():
                return
            time.sleep(0.25)
        raise RolloutError(f"server at {self.url} not healthy after {self.startup_timeout_s} s")

    def healthy(self) -> bool:
        try:
            http_json(f"{self.url}/health", timeout_s=5)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def restart_if_dead(self) -> bool:
        """Restart the process if it exited; True if this call restarted it."""
        with self._lock:
            if self.alive():
                return False
            self.num_restarts += 1
            print(f"rollout server {self.url} exited with code {self.process.returncode}; "
                  f"restarting it (restart {self.num_restarts})", file=sys.stderr, flush=True)
            self.start()
            return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SGLangClient:
    """The rollout interface over SGLang's native HTTP API."""

    def __init__(self, servers: Sequence[ServerProcess | str], *, concurrency: int = 8,
                 prompts_per_request: int = 32, timeout_s: float = 600.0, max_retries: int = 3,
                 api_key: str | None = None,
                 on_restart: Callable[[ServerProcess], None] | None = None,
                 server_offset: int = 0) -> None:
        if not servers:
            raise ValueError("--sglang-url or a launched server is required")
        self.servers = list(servers)
        self.concurrency = concurrency
        self.prompts_per_request = prompts_per_request
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.api_key = api_key
        self.on_restart = on_restart
        self.server_offset = server_offset
        """Request i goes to server (i + server_offset) % servers: clients of different DP
        ranks (offset = dp_rank) start on different servers."""
        self.rid_prefix = f"paced-{secrets.token_hex(4)}"
        """Unique per client: SGLang keys its in-flight requests by rid, and the clients of
        several DP ranks share servers."""
        self._server_info: dict[str, dict] = {}
        self.num_retries = 0
        self.num_aborted = 0

    def url_of(self, server) -> str:
        return server.url if isinstance(server, ServerProcess) else server.rstrip("/")

    def post(self, server, path: str, body: dict | None = None, *, timeout_s: float | None = None):
        return http_json(self.url_of(server) + path, body, timeout_s=timeout_s or self.timeout_s,
                         api_key=self.api_key)

    def post_all(self, path: str, body: dict | None = None) -> list:
        return [self.post(server, path, body) for server in self.servers]

    def get_newer(self, server, path: str, deprecated: str):
        """GET ``path``, or ``deprecated`` from a server that predates it (404)."""
        try:
            return self.post(server, path)
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
        return self.post(server, deprecated)

    def server_info(self, server) -> dict:
        """SGLang's ``/server_info`` (its resolved server arguments: ``tp_size``,
        ``enable_deterministic_inference``, ...), cached per server until it restarts."""
        url = self.url_of(server)
        if url not in self._server_info:
            info = self.get_newer(server, "/server_info", "/get_server_info")
            self._server_info[url] = info if isinstance(info, dict) else {}
        return self._server_info[url]

    def model_info(self, server) -> dict:
        """``/model_info`` (``/get_model_info`` is deprecated since 0.5.21): ``weight_version``."""
        info = self.get_newer(server, "/model_info", "/get_model_info")
        return info if isinstance(info, dict) else {}

    def forget_server_info(self, server) -> None:
        """A server restarted (maybe with other arguments): ask it again."""
        self._server_info.pop(self.url_of(server), None)

    def release_memory(self) -> None:
        """Colocated servers give their GPU memory (weights, KV cache) back for training."""
        self.post_all("/release_memory_occupation", {})

    def resume_memory(self) -> None:
        """Take the memory back before the next generation (then push weights)."""
        self.post_all("/resume_memory_occupation", {})

    def health(self) -> bool:
        try:
            self.post_all("/health")
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seed: int) -> list[list[Completion]]:
        sampling.validate()
        chunks = [list(range(i, min(i + self.prompts_per_request, len(prompts))))
                  for i in range(0, len(prompts), self.prompts_per_request)]
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._run_chunk, index, chunk, prompts, n, sampling, seed)
                       for index, chunk in enumerate(chunks)]
            for future in futures:
                for completion in future.result():
                    slot = results[completion.prompt_index]
                    if slot[completion.sample_index] is not None:
                        raise RolloutError(f"duplicate completion for prompt "
                                           f"{completion.prompt_index} sample "
                                           f"{completion.sample_index}")
                    slot[completion.sample_index] = completion
        missing = [(p, s) for p, row in enumerate(results) for s, c in enumerate(row) if c is None]
        if missing:
            raise RolloutError(f"no completion for (prompt, sample) {missing[:5]}")
        return results  # type: ignore[return-value]

    @staticmethod
    def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
        """The seed of one (prompt, sample) on a deterministic server: a function of the
        call's seed and the slot alone, so the samples do not depend on how the call was cut
        into requests."""
        return (seed * 1_000_003 + prompt_index * 1_009 + sample_index) & ((1 << 63) - 1)

    @staticmethod
    def request_body(chunk: list[int], prompts, n: int, sampling: SamplingParams, seed: int,
                     chunk_index: int, *, deterministic: bool = False,
                     rid_prefix: str = "paced") -> tuple[dict, list[tuple[int, int]]]:
        """The /generate body of one request (SGLang's ``GenerateReqInput``) and the
        (prompt, sample) slot of each of its outputs, in SGLang's output order."""
        params = sampling.to_sglang()
        slots = [(p, j) for p in chunk for j in range(n)]  # SGLang answers prompt-major
        if not deterministic:  # n samples of each prompt
            return {"input_ids": [prompts[p] for p in chunk],
                    "sampling_params": {**params, "n": n}, "return_logprob": True,
                    "rid": [f"{rid_prefix}-s{seed}-c{chunk_index}-p{p}" for p in chunk]}, slots
        # One row per (prompt, sample), each with its own seed: SGLang's n copies of a
        # prompt would share one seed and so be the same completion.
        return {"input_ids": [prompts[p] for p, _ in slots],
                "sampling_params": [{**params, "n": 1,
                                     "sampling_seed": SGLangClient.sample_seed(seed, p, j)}
                                    for p, j in slots],
                "return_logprob": True,
                "rid": [f"{rid_prefix}-s{seed}-c{chunk_index}-p{p}-n{j}" for p, j in slots]}, \
            slots

    def _run_chunk(self, chunk_index: int, chunk: list[int], prompts, n: int,
                   sampling: SamplingParams, seed: int) -> list[Completion]:
        server = self.servers[(chunk_index + self.server_offset) % len(self.servers)]
        last_error: Exception | None = None
        attempt = aborts = 0
        while attempt <= self.max_retries:
            try:
                deterministic = bool(self.server_info(server).get(
                    "enable_deterministic_inference"))
                # A fresh rid per attempt: SGLang keeps a dropped request's rid until its
                # abort is answered and refuses the same rid again meanwhile (400).
                body, slots = self.request_body(
                    chunk, prompts, n, sampling, seed, chunk_index, deterministic=deterministic,
                    rid_prefix=f"{self.rid_prefix}-a{attempt}.{aborts}")
                outputs = self.post(server, "/generate", body)
                return self._parse(outputs, slots, prompts)
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    raise RolloutError(f"server {self.url_of(server)} rejected a request: "
                                       f"{err.reason}") from None
                last_error = err
            except AbortedRequest as err:  # /pause_generation's abort mode: asked again
                last_error, aborts = err, aborts + 1
                self.num_aborted += 1
                if aborts <= MAX_ABORTS_PER_REQUEST:
                    time.sleep(0.05)
                    continue
            except (OSError, urllib.error.URLError, ConnectionError) as err:
                last_error = err
            self.num_retries += 1
            self.forget_server_info(server)  # it may have come back with other arguments
            if isinstance(server, ServerProcess) and server.restart_if_dead():
                if self.on_restart is not None:
                    self.on_restart(server)
            else:
                time.sleep(min(2.0 ** attempt * 0.5, 10.0))
            attempt += 1
        raise RolloutError(f"prompts {chunk[0]}..{chunk[-1]} failed after {self.max_retries} "
                           f"retries on {self.url_of(server)}: {last_error}")

    @staticmethod
    def _parse(outputs, slots: list[tuple[int, int]], prompts) -> list[Completion]:
        """Completions of one answer; output k fills ``slots[k]``. An output whose
        ``prompt_tokens`` is not its prompt's length means the server ordered its outputs
        otherwise than SGLang: refused, never scored against another prompt."""
        if isinstance(outputs, dict):
            outputs = [outputs]
        if not isinstance(outputs, list) or len(outputs) != len(slots):
            raise RolloutError(f"expected {len(slots)} outputs, got "
                               f"{len(outputs) if isinstance(outputs, list) else outputs!r}")
        completions = []
        for (prompt_index, sample_index), output in zip(slots, outputs):
            meta = output["meta_info"]
            finish = meta.get("finish_reason") or {}
            if finish.get("type") == "abort":
                raise AbortedRequest(f"request {meta.get('id')} was aborted")
            reported = meta.get("prompt_tokens")
            if reported is not None and reported != len(prompts[prompt_index]):
                raise RolloutError(
                    f"output for prompt {prompt_index} sample {sample_index} reports "
                    f"{reported} prompt tokens, the prompt has {len(prompts[prompt_index])}: "
                    "the server does not answer in SGLang's order (output i * n + j is sample "
                    "j of prompt i)")
            triples = meta.get("output_token_logprobs") or []
            token_ids = list(output.get("output_ids") or [t for _, t, _ in triples])
            completions.append(Completion(
                prompt_index=prompt_index, sample_index=sample_index,
                token_ids=token_ids, log_probs=[float(lp) for lp, _, _ in triples],
                finish_reason="stop" if finish.get("type") == "stop" else "length",
                weight_version=oldest_weight_version(meta)))
        return completions

    def close(self) -> None:
        for server in self.servers:
            if isinstance(server, ServerProcess):
                server.stop()


def serve_command(*args: str) -> list[str]:
    """The command of this package's own rollout server (for tests and CPU runs)."""
    return [sys.executable, "-m", "megatron_paced.rollout.serve", *args]
