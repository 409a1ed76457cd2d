"""Validation of the rollout server's requests: pure functions that turn a JSON body into a
checked request or raise :class:`RequestError` (an HTTP 4xx with a message naming the field).

Contract: every check that can be made before any work is made here: token ids are integers
(not booleans) in ``[0, vocab)``, ``n`` and ``max_new_tokens`` integers in range, prompts
shorter than the server's maximum length, the request within :class:`ServerLimits`, SGLang
fields this server does not implement refused by name; a weight update names only tensors
of the served model, with their shapes, floating dtypes and finite values
(:func:`validate_hf_update`), before anything is loaded.

Usage::

    request = parse_generate_request(body, vocab_size=512, max_sequence_length=2048,
                                     limits=ServerLimits())
    validate_hf_update({"model.norm.weight": tensor}, model_cfg, complete=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_paced.config import ConfigError
from megatron_paced.models.hf_mapping import hf_param_shapes
from megatron_paced.rollout.engine import SamplingParams
from megatron_paced.rollout.sglang_source import normalize_generate

# SGLang /generate fields this server does not implement: refused by name, never ignored.
UNSUPPORTED_FIELDS = {"text", "input_embeds", "image_data", "audio_data", "video_data",
                      "lora_path", "stream", "return_text_in_logprobs", "logprob_start_len",
                      "top_logprobs_num", "token_ids_logprob", "custom_logit_processor",
                      "return_hidden_states", "session_params", "bootstrap_host",
                      "bootstrap_port", "bootstrap_room", "data_parallel_rank"}
KNOWN_FIELDS = {"input_ids", "sampling_params", "return_logprob", "rid"}
UNSUPPORTED_SAMPLING = {"regex", "json_schema", "ebnf", "structural_tag", "frequency_penalty",
                        "presence_penalty", "repetition_penalty", "min_p", "min_new_tokens",
                        "stop", "ignore_eos", "skip_special_tokens", "logit_bias",
                        "spaces_between_special_tokens", "no_stop_trim", "custom_params"}
KNOWN_SAMPLING = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "n",
                  "sampling_seed"}


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for (flags of the same names)."""

    max_body_bytes: int = 256 << 20
    max_n: int = 64
    max_prompts_per_request: int = 1024
    max_total_tokens: int = 1 << 20  # prompts x n x (prompt + max_new_tokens)
    max_workers: int = 16
    socket_timeout_s: float = 60.0
    update_group_timeout_s: float = 60.0


FLUSH_DONE = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
              "running or waiting requests, the operation will not be performed.)\n")
FLUSH_FAILED = "Flush cache failed.\n"  # SGLang's answer when the message is empty


@dataclass
class TextAnswer:
    """A plain-text answer (SGLang's ``Response(content=...)``: no JSON)."""

    status: int
    text: str


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def int_field(value, name: str, *, low: int, high: int | None = None) -> int:
    """An integer request field (not a bool, float or string) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, not {value!r}"[:200])
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(400, f"{name} {value} must be {bound}")
    return value


def _number_field(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise RequestError(400, f"{name} must be a finite number, not {value!r}"[:200])
    return float(value)


def _token_list(value, name: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, f"{name} must be a non-empty list of token ids")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise RequestError(400, f"{name}: {token!r} is not a token id in [0, "
                                    f"{vocab_size})"[:200])
    return value


@dataclass
class GenerateRequest:
    prompts: list[list[int]]
    single: bool
    n: int
    sampling: object  # SamplingParams
    seeds: list[int | None]
    """Each prompt's ``sampling_seed`` (its n copies share it, as in SGLang)."""
    rids: list | str | None
    return_logprob: bool
    from_text: bool = False
    """The prompts came as ``text`` (tokenized by the server's tokenizer)."""

    @property
    def seed(self) -> int | None:
        return self.seeds[0]


RID_LENGTH_MESSAGE = "The specified rids length mismatch with the batch_size for batch processing."
"""SGLang's own words (``io_struct.GenerateReqInput._normalize_rid``)."""


def sglang_normalization(body: dict) -> None:
    """Run SGLang's own ``GenerateReqInput.normalize_batch_and_arguments`` on the body where
    the installed wheel allows it (:mod:`megatron_paced.rollout.sglang_source`); its
    ValueError is SGLang's 400."""

    known = {k: v for k, v in body.items() if k in KNOWN_FIELDS}
    try:
        normalize_generate(known)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise RequestError(400, str(err)[:300]) from None


def tokenize_text(body: dict, tokenizer) -> dict:
    """A body with ``text`` (a string or a list of strings) -> the same with ``input_ids``,
    tokenized as SGLang's ``TokenizerManager._tokenize_texts`` does (the HF tokenizer's call,
    special tokens added); SGLang's error where both are given (``io_struct.py``)."""
    text = body["text"]
    if body.get("input_ids") is not None:
        raise RequestError(400, "text and input_ids cannot be provided at the same time")
    single = isinstance(text, str)
    texts = [text] if single else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "text must be a string or a non-empty list of strings")
    ids = tokenizer(texts)["input_ids"]
    return {**{k: v for k, v in body.items() if k != "text"},
            "input_ids": ids[0] if single else ids}


def parse_generate_request(body: dict, *, vocab_size: int, max_sequence_length: int,
                           limits: ServerLimits, tokenizer=None) -> GenerateRequest:
    """Validate a /generate body completely (before any work) -> the request; a
    :class:`RequestError` 400 naming the field otherwise. With ``tokenizer`` (an HF one),
    ``text`` prompts are tokenized first."""

    from_text = tokenizer is not None and "text" in body
    if from_text:
        body = tokenize_text(body, tokenizer)
    unsupported = sorted(set(body) & UNSUPPORTED_FIELDS)
    if unsupported:
        raise RequestError(400, f"{', '.join(unsupported)}: not supported by this server"
                                + (" (it has no tokenizer: start it with --tokenizer DIR, "
                                   "or send input_ids)" if "text" in unsupported else ""))
    unknown = sorted(set(body) - KNOWN_FIELDS - UNSUPPORTED_FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown[:4]}"[:200])
    input_ids = body.get("input_ids")
    if input_ids is None:
        raise RequestError(400, "this server needs input_ids or text" if tokenizer is not None
                           else "this server needs input_ids (it has no tokenizer for text: "
                                "start it with --tokenizer DIR)")
    if not isinstance(input_ids, list) or not input_ids:
        raise RequestError(400, "input_ids must be a non-empty list of token ids, or a list "
                                "of such lists")
    single = not isinstance(input_ids[0], list)
    prompts = [input_ids] if single else input_ids
    if len(prompts) > limits.max_prompts_per_request:
        raise RequestError(413, f"{len(prompts)} prompts in one request; at most "
                                f"{limits.max_prompts_per_request} (--max-prompts-per-request)")
    prompts = [_token_list(p, "input_ids" if single else f"input_ids[{i}]", vocab_size)
               for i, p in enumerate(prompts)]
    params = body.get("sampling_params")
    if params is None:
        params = {}
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    if not per_prompt or not all(isinstance(p, dict) for p in per_prompt):
        raise RequestError(400, "sampling_params must be an object or a list of objects")
    if len(per_prompt) != len(prompts):
        raise RequestError(400, f"sampling_params: a list needs one object per prompt "
                                f"({len(prompts)}), got {len(per_prompt)}")

    def without_seed(p: dict) -> dict:
        return {k: v for k, v in p.items() if k != "sampling_seed"}

    if any(without_seed(p) != without_seed(per_prompt[0]) for p in per_prompt):
        raise RequestError(400, "per-prompt sampling_params may differ only in sampling_seed "
                                "here")
    params = per_prompt[0]
    refused = sorted(set(params) & UNSUPPORTED_SAMPLING)
    if refused:
        raise RequestError(400, f"sampling_params {', '.join(refused)}: not supported by this "
                                "server")
    unknown = sorted(set(params) - KNOWN_SAMPLING - UNSUPPORTED_SAMPLING)
    if unknown:
        raise RequestError(400, f"sampling_params: unknown field(s) {unknown[:4]}"[:200])
    n = int_field(params.get("n", 1), "sampling_params.n", low=1, high=limits.max_n)
    seeds = [None if p.get("sampling_seed") is None else
             int_field(p["sampling_seed"], "sampling_params.sampling_seed", low=-(1 << 63),
                       high=(1 << 63) - 1) for p in per_prompt]
    sampling = SamplingParams()
    if "temperature" in params:
        sampling.temperature = _number_field(params["temperature"], "sampling_params.temperature")
    if "top_p" in params:
        sampling.top_p = _number_field(params["top_p"], "sampling_params.top_p")
    if "top_k" in params:
        sampling.top_k = int_field(params["top_k"], "sampling_params.top_k", low=-1)
    if "max_new_tokens" in params:
        sampling.max_new_tokens = int_field(params["max_new_tokens"],
                                             "sampling_params.max_new_tokens", low=1)
    if "stop_token_ids" in params and params["stop_token_ids"] is not None:
        stop = params["stop_token_ids"]
        sampling.stop_token_ids = [] if stop == [] else _token_list(
            stop, "sampling_params.stop_token_ids", vocab_size)
    try:
        sampling.validate()
    except ConfigError as err:
        raise RequestError(400, f"sampling_params: {err}") from None
    longest = max(len(p) for p in prompts)
    if longest >= max_sequence_length:  # (completions stop at the maximum length)
        raise RequestError(400, f"a prompt of {longest} tokens leaves no room under the "
                                f"server's --max-sequence-length {max_sequence_length}")
    if "max_new_tokens" in params and longest + sampling.max_new_tokens > max_sequence_length:
        # SGLang's 400, in its words (TokenizerManager._validate_one_request, without
        # --allow-auto-truncate): a request asking past the context is refused, not capped.
        raise RequestError(400, f"Requested token count exceeds the model's maximum context "
                                f"length of {max_sequence_length} tokens. You requested a total "
                                f"of {longest + sampling.max_new_tokens} tokens: {longest} "
                                f"tokens from the input messages and {sampling.max_new_tokens} "
                                f"tokens for the completion. Please reduce the number of tokens "
                                f"in the input messages or the completion to fit within the "
                                f"limit.")
    total = n * sum(min(len(p) + sampling.max_new_tokens, max_sequence_length)
                    for p in prompts)
    if total > limits.max_total_tokens:
        raise RequestError(413, f"the request asks for up to {total} tokens (prompts x n x "
                                f"(prompt + max_new_tokens)); at most {limits.max_total_tokens} "
                                "(--max-total-tokens)")
    rids = body.get("rid")
    if isinstance(rids, list):  # one per prompt: SGLang expands it over the n samples
        if len(rids) != len(prompts):
            raise RequestError(400, RID_LENGTH_MESSAGE)
        if not all(isinstance(r, str) for r in rids):
            raise RequestError(400, "The rid should be a string or a list of strings.")
        if len(set(rids)) != len(rids):
            raise RequestError(400, f"Duplicate request IDs detected within the request: "
                                    f"{sorted(r for r in set(rids) if rids.count(r) > 1)[:4]}")
    elif rids is not None and not isinstance(rids, str):
        raise RequestError(400, "The rid should be a string or a list of strings.")
    return_logprob = body.get("return_logprob", False)
    if not isinstance(return_logprob, bool):
        raise RequestError(400, "return_logprob must be true or false")
    sglang_normalization(body)  # SGLang's own code has the last word where it is installed
    return GenerateRequest(prompts, single, n, sampling, seeds, rids, return_logprob,
                           from_text=from_text)


def validate_update_shapes(named_shapes, model_cfg) -> dict[str, tuple[int, ...]]:
    """Every ``(name, shape)`` of a weight update names a tensor of this model, with its
    shape; raises a 400 naming the first that does not. Returns the model's HF shapes."""

    shapes = hf_param_shapes(model_cfg)
    for name, shape in named_shapes:
        if not isinstance(name, str) or name not in shapes:
            raise RequestError(400, f"{str(name)[:120]!r} is not a tensor of this model")
        if not isinstance(shape, (list, tuple, torch.Size)) or \
                tuple(shape) != tuple(shapes[name]):
            raise RequestError(400, f"{name}: shape {str(shape)[:60]}, the model's is "
                                    f"{tuple(shapes[name])}")
    return shapes


def validate_hf_update(hf: dict, model_cfg, *, complete: bool) -> None:
    """Every tensor of a weight update names a tensor of this model, with its shape and a
    floating dtype; with ``complete`` none is missing. Raises a 400 naming the first problem
    (nothing has been loaded yet; non-finite values are refused by ``load_full_params_``,
    before it copies anything)."""
    for name, tensor in hf.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise RequestError(400, f"{str(name)[:120]}: not a floating-point tensor")
    shapes = validate_update_shapes(((name, tuple(t.shape)) for name, t in hf.items()),
                                    model_cfg)
    if complete:
        missing = [name for name in shapes if name not in hf]
        if missing:
            raise RequestError(400, f"the update misses {len(missing)} tensor(s) of the "
                                    f"model, e.g. {missing[0]!r}")


def optional_version(body: dict) -> str | None:
    value = body.get("weight_version")
    return None if value is None else version_string(value, "weight_version")


def version_string(value, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > 200:
        raise RequestError(400, f"{name} must be a string or an integer")
    return str(value)
