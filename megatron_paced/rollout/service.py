"""The rollout server's model side: the embedded engine on a model of its own, generation as
SGLang answers it (prompt-major outputs, seeds only with deterministic inference, tempered
log-probs unless ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``), pause and continue, and the state
the endpoints share. The weight-update endpoints are in
:mod:`megatron_paced.rollout.service_weights`; the HTTP layer in
:mod:`megatron_paced.rollout.http_api`.

Usage::

    service = RolloutService(PRESETS["tiny-llama"], seed=1, hf_dir=None,
                             max_sequence_length=64, max_batch_size=8)
    outputs = service.generate({"input_ids": [[1, 2]], "sampling_params": {"n": 2}})
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import torch

from megatron_paced.config import ParallelConfig
from megatron_paced.models.gpt import build_gpt_model
from megatron_paced.models.hf_mapping import hf_to_megatron
from megatron_paced.models.sharding import load_full_params_
from megatron_paced.parallel import initialize_parallel
from megatron_paced.rollout.engine import EmbeddedEngine
from megatron_paced.rollout.requests import (
    RequestError,
    ServerLimits,
    parse_generate_request,
    validate_hf_update,
    version_string,
)
from megatron_paced.rollout.service_weights import WeightEndpoints
from megatron_paced.utils import free_port, is_torchrun_variable


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


class RolloutService(WeightEndpoints):
    """The model, its engine and the state the endpoints share."""

    def __init__(self, model_cfg, *, seed: int, hf_dir: str | None, max_sequence_length: int,
                 max_batch_size: int, limits: ServerLimits = ServerLimits(),
                 allowed_peers: tuple[str, ...] = (), generate_delay_s: float = 0.0,
                 weight_version_lag: int = 0, deterministic: bool = False,
                 weight_update_session: bool = True, base_gpu_id: int = 0,
                 tokenizer=None) -> None:
        # The server is a world of one, even when started from a torchrun-launched trainer
        # whose rendezvous variables it inherits.
        for name in list(os.environ):
            if is_torchrun_variable(name):
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
        self.tokenizer = tokenizer  # an HF tokenizer: "text" prompts, decoded "text" outputs
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
        self.inflight_rids: set[str] = set()
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
                                         limits=self.limits, tokenizer=self.tokenizer)
        if self.released:
            raise RequestError(400, "memory is released; call /resume_memory_occupation")
        rids = [request.rids] if isinstance(request.rids, str) else list(request.rids or [])
        with self.gate:  # SGLang refuses a rid still in flight (tokenizer_manager.py)
            taken = [rid for rid in rids if rid in self.inflight_rids]
            if taken:
                raise RequestError(400, f"Duplicate request ID detected: {taken[0]}"[:200])
            self.inflight_rids.update(rids)
        try:
            return self._generate(request)
        finally:
            with self.gate:
                self.inflight_rids.difference_update(rids)

    def _generate(self, request):
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
                text = "" if self.tokenizer is None else self.tokenizer.decode(
                    c.token_ids, skip_special_tokens=True)  # SGLang's detokenizer default
                outputs.append({"text": text, "output_ids": c.token_ids, "meta_info": meta})
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

    def server_info(self):
        """A few of SGLang's resolved server arguments (flat, as ``ServerArgs.resolved_dict``)."""
        return {"tp_size": 1, "dp_size": 1, "pp_size": 1, "model_path": self.model_path,
                "base_gpu_id": self.base_gpu_id,
                "enable_deterministic_inference": self.deterministic,
                "version": "megatron-paced"}  # the live weight_version is /model_info's

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
