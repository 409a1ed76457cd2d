"""The rollout interface, and the embedded engine: KV-cached sampling on the Megatron model.

Every rollout backend (this in-process engine, the SGLang client) answers

    generate(prompts: list[list[int]], n, sampling, seed) -> list[list[Completion]]
    update_weights(...) ; health() -> bool

``generate`` returns, for each prompt, ``n`` completions with their token ids and the
log-probability of each generated token under the model (the full-vocabulary softmax of the
raw logits, i.e. temperature 1 -- the policy pi itself, whatever temperature sampled it), so
the trainer can use them as pi_old.

The embedded engine runs on the trainer's own ``GPTModel`` stage with Megatron's
``StaticInferenceContext`` (a static KV cache). Rows of different prompt lengths share one
batch: the prefill covers the shortest prompt, then each decode step feeds, per row, either
the row's next prompt token (still inside its prompt) or the token just sampled -- every
position is real, so plain causal attention is exact. With tensor parallelism the logits are
gathered over TP (one (b, V) row per step), every TP rank samples, and TP rank 0's tokens
are broadcast so the ranks cannot drift apart. It is the default backend when no server is
configured and what runs on the CPU. Pipeline parallelism is not supported here (use the
SGLang backend).

Usage::

    engine = EmbeddedEngine(policy.modules(), ctx, vocab_size=cfg.vocab_size,
                            max_sequence_length=64)
    out = engine.generate([[1, 5, 6], [1, 7]], n=4,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=8,
                                                  stop_token_ids=[2]), seed=0)
    out[0][3].token_ids, out[0][3].log_probs, out[0][3].finish_reason
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_paced.config import ConfigError, require
from megatron_paced.forward_backward import SequenceBatch
from megatron_paced.models.sharding import unwrap_model


@dataclass
class SamplingParams:
    """Sampling settings, with SGLang's field names."""

    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1: no top-k filter."""
    max_new_tokens: int = 128
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
                self.temperature, "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 or >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")

    def to_sglang(self) -> dict:
        """The ``sampling_params`` object of SGLang's /generate."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "stop_token_ids": list(self.stop_token_ids)}


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str  # "stop" (a stop token, included in token_ids) or "length"
    weight_version: int | None = None
    """The weights that generated it (the trainer's step after which they were pushed); None
    when the backend did not say."""


def done_future(value) -> Future:
    """A future that already holds ``value`` (what a synchronous backend's submit returns)."""
    future: Future = Future()
    future.set_result(value)
    return future


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: (b, V) -> (b, V) with removed entries -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first over
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams,
                  generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One token per row from (b, V) logits under the sampling settings (``generator``: one
    for the batch, or one per row); NaN or +inf logits (a diverged policy) raise
    FloatingPointError."""
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise FloatingPointError("non-finite logits while sampling (the policy's weights hold "
                                 "NaN or inf)")
    if sampling.temperature == 0:
        return logits.argmax(-1)
    # On the host, with its generator: the same draws on every device, and the cumsum of top-p
    # has no deterministic CUDA kernel (--deterministic-mode would refuse it).
    scaled = filter_logits(logits.float().cpu() / sampling.temperature, sampling.top_k,
                           sampling.top_p)
    probs = torch.softmax(scaled, dim=-1)
    if isinstance(generator, list):  # one seed per row
        return torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=g)[:, 0]
                          for row, g in enumerate(generator)]).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


class EmbeddedEngine:
    """In-process generation on this rank's model stage (TP-aware, PP = 1); a
    :class:`~megatron_paced.rollout.RolloutBackend` whose TP ranks all take part."""

    asked_once_per_replica = False

    def __init__(self, model: list[torch.nn.Module], ctx, *, vocab_size: int,
                 max_sequence_length: int, max_batch_size: int = 64) -> None:
        if ctx.pp_size > 1:
            raise ConfigError(
                f"--pipeline-model-parallel-size {ctx.pp_size}: the embedded rollout engine "
                "needs 1; use the SGLang backend for pipeline-parallel policies")

        self.model = [unwrap_model(m) for m in model]
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.weight_version = 0

    def health(self) -> bool:
        return True

    def update_weights(self, version: int | None = None) -> int:
        """The engine reads the trainer's weights in place: a push only bumps the version."""
        self.weight_version = self.weight_version + 1 if version is None else version
        return self.weight_version

    def sync_weights(self, model: list[torch.nn.Module], version: int) -> None:
        """Nothing to copy: the engine generates from the trainer's own modules."""
        self.update_weights(version)

    def submit(self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int,
               min_version: int | None = None) -> Future:
        """Generate now, on the trainer's weights as they are (so ``--max-staleness K``
        generates step j's samples at the start of step j - K): a finished future."""
        return done_future(self.generate(prompts, n, sampling, seed))

    def drain(self) -> None:
        """Nothing runs in the background."""

    def kill_first_server(self) -> None:
        """No server to kill: the engine is this process."""

    def close(self) -> None:
        """Nothing to release."""

    def generate_seeded(self, prompts: list[list[int]], sampling: SamplingParams,
                        seeds: list[int], *, tempered_log_probs: bool = False
                        ) -> list[Completion]:
        """One completion per row, each sampled with its own seed (rows with the same prompt
        and seed are the same completion), as SGLang's deterministic inference samples;
        ``tempered_log_probs``: log-probs of the temperature-scaled logits, as SGLang returns
        them by default."""
        def generators(chunk_index: int, start: int, end: int) -> list[torch.Generator]:
            return [torch.Generator().manual_seed(seed & ((1 << 63) - 1))
                    for seed in seeds[start:end]]

        sampling.validate()
        out = self._generate_rows(prompts, sampling, generators, tempered_log_probs)
        for row, completion in enumerate(out):
            completion.prompt_index, completion.sample_index = row, 0
        return out

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 seed: int, *, tempered_log_probs: bool = False) -> list[list[Completion]]:
        sampling.validate()
        require(n >= 1, "num_samples_per_prompt", n, "must be >= 1")
        rows = [(p, s) for p in range(len(prompts)) for s in range(n)]

        def generator(chunk_index: int, start: int, end: int) -> torch.Generator:
            return torch.Generator().manual_seed((seed * 1_000_003 + chunk_index)
                                                 & ((1 << 63) - 1))

        out: list[list[Completion]] = [[None] * n for _ in prompts]  # type: ignore[list-item]
        for (p, s), completion in zip(rows, self._generate_rows(
                [prompts[p] for p, _ in rows], sampling, generator, tempered_log_probs)):
            completion.prompt_index, completion.sample_index = p, s
            out[p][s] = completion
        return out

    @torch.no_grad()
    def _generate_rows(self, rows: list[list[int]], sampling: SamplingParams, generator_of,
                       tempered_log_probs: bool) -> list[Completion]:
        """A completion of each row, in order, in chunks of ``max_batch_size`` rows (chunk k,
        rows [start, end), sampled with ``generator_of(k, start, end)``), in eval mode."""
        out: list[Completion] = []
        model = self.model[0]
        was_training = model.training
        model.eval()
        try:
            for chunk_index, start in enumerate(range(0, len(rows), self.max_batch_size)):
                end = min(start + self.max_batch_size, len(rows))
                out += self._generate_chunk(rows[start:end], sampling,
                                            generator_of(chunk_index, start, end),
                                            tempered_log_probs)
        finally:
            model.train(was_training)
        for completion in out:
            completion.weight_version = self.weight_version
        return out

    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams,
                        generator, tempered_log_probs: bool = False) -> list[Completion]:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = self.ctx.device
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("an empty prompt cannot be continued")
        if max(lengths) >= self.max_sequence_length:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room under the "
                             f"maximum sequence length {self.max_sequence_length}")
        total = min(max(lengths) + sampling.max_new_tokens, self.max_sequence_length)
        batch = len(prompts)
        tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
        prompt_len = torch.tensor(lengths, device=device)
        positions = torch.arange(total, device=device).expand(batch, -1)
        context = StaticInferenceContext(batch, total)
        model = self.model[0]
        start = min(lengths)
        logits = model(tokens[:, :start], positions[:, :start], None,
                       inference_context=context, runtime_gather_output=True)[:, -1]
        context.sequence_len_offset = start
        generated: list[list[int]] = [[] for _ in prompts]
        log_probs: list[list[float]] = [[] for _ in prompts]
        finish = [""] * batch
        stop_ids = set(sampling.stop_token_ids or [])
        for t in range(start, total):
            logits = logits.float()[:, : self.vocab_size]  # drop the vocabulary padding
            sampled = sample_tokens(logits, sampling, generator)
            if self.ctx.tp_size > 1:
                dist.broadcast(sampled, src=dist.get_global_rank(self.ctx.tp_group, 0),
                               group=self.ctx.tp_group)
            scale = sampling.temperature if tempered_log_probs and sampling.temperature > 0 \
                else 1.0
            token_log_probs = torch.log_softmax(logits / scale, -1).gather(
                -1, sampled[:, None])[:, 0]
            next_tokens = torch.where(t < prompt_len, tokens[:, t], sampled)
            # One device-to-host copy per step (per-element reads would each wait on the GPU).
            sampled_host, log_probs_host = sampled.tolist(), token_log_probs.tolist()
            for row in range(batch):
                if t < lengths[row] or finish[row]:
                    continue
                generated[row].append(sampled_host[row])
                log_probs[row].append(log_probs_host[row])
                if sampled_host[row] in stop_ids:
                    finish[row] = "stop"
                elif len(generated[row]) >= sampling.max_new_tokens or t == total - 1:
                    finish[row] = "length"
            if all(finish):
                break
            tokens[:, t] = next_tokens
            logits = model(tokens[:, t:t + 1], positions[:, t:t + 1], None,
                           inference_context=context, runtime_gather_output=True)[:, -1]
            context.sequence_len_offset += 1
        return [Completion(-1, -1, generated[row], log_probs[row], finish[row] or "length")
                for row in range(batch)]


@dataclass
class RolloutBatch(SequenceBatch):
    """Generated rows: prompt + completion tokens with the generating engine's log-probs."""

    rollout_log_probs: torch.Tensor
    """(B, T) the engine's token log-probs at the completion positions, 0 elsewhere."""


def completions_to_batch(prompts: list[list[int]], completions: list[list[Completion]],
                         seq_length: int) -> RolloutBatch:
    """Prompt + completion rows, right-padded to ``seq_length``, in (prompt, sample) order:
    the completion mask covers the generated tokens."""
    rows = [(p, c) for p, per_prompt in enumerate(completions) for c in per_prompt]
    tokens = torch.zeros(len(rows), seq_length, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_length)
    rollout_log_probs = torch.zeros(len(rows), seq_length)
    for i, (p, c) in enumerate(rows):
        ids = prompts[p] + c.token_ids
        if len(ids) > seq_length:
            raise ValueError(f"prompt {p} with its completion has {len(ids)} tokens; "
                             f"seq_length is {seq_length}")
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(prompts[p]): len(ids)] = 1.0
        rollout_log_probs[i, len(prompts[p]): len(ids)] = torch.tensor(c.log_probs)
    return RolloutBatch(tokens, mask, rollout_log_probs)
