"""The client's bodies against SGLang's own code, and the project's server against SGLang's
behaviour, both read from the installed sglang wheel (``pip install --no-deps sglang``;
``import sglang`` itself needs CUDA).

From SGLang 0.5.21-0.5.23's source:

* ``sglang/api/v1/api_types.py`` ``GenerateRequest.from_json_value``: the JSON contract gate
  (0.5.23 only; the Makefile installs 0.5.23).
* ``sglang/srt/managers/io_struct.py`` ``GenerateReqInput.normalize_batch_and_arguments``:
  a ``rid`` list has one entry per prompt (``_normalize_rid``, else 400); executed from the
  wheel by :mod:`megatron_paced.rollout.sglang_source`.
* ``sglang/srt/managers/tokenizer_manager.py`` ``_handle_batch_request``: with ``n`` the
  outputs are prompt-major (``for i in range(batch_size): for _ in range(n)``).
* ``sglang/srt/entrypoints/http_server.py``: ``/flush_cache`` answers plain text (200
  "Cache flushed...", 400 "Flush cache failed." while requests run); ``/model_info``
  (``/get_model_info`` deprecated); ``/server_info``.
* ``sglang/srt/managers/scheduler_components/weight_updater.py``: tensor and distributed
  updates only between ``begin_weight_update`` and ``end_weight_update``.
* ``sglang/srt/layers/sampler.py``: log-probs of the temperature-scaled logits unless
  ``SGLANG_RETURN_ORIGINAL_LOGPROB``; ``sampling_seed`` only with deterministic inference,
  where the n copies of a prompt share it.
* ``sglang/srt/utils/weight_versions.py``: ``meta_info.weight_versions`` spans.

Skipped, with the reason, where the wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
import urllib.request

import pytest

from megatron_paced.rollout.engine import SamplingParams
from megatron_paced.rollout.sglang_client import (
    SGLangClient, http_json, oldest_weight_version, server_environment,
)
from tests.conftest import chat_tokenizer

PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10]]


def _sglang_api_types():
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang is not installed (pip install --no-deps sglang msgspec)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "api", "v1", "api_types.py")
    if not os.path.isfile(path):
        pytest.skip(f"this sglang has no {path} (the JSON contract gate moved)")
    try:
        import msgspec  # noqa: F401
    except ImportError:
        pytest.skip("msgspec is not installed")
    module_spec = importlib.util.spec_from_file_location("sglang_api_types", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _io_struct():
    from megatron_paced.rollout.sglang_source import load_io_struct

    module = load_io_struct()
    if module is None:
        pytest.skip("sglang's io_struct.GenerateReqInput could not be loaded from the wheel")
    return module


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    SamplingParams(temperature=0.0, max_new_tokens=3),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=64, stop_token_ids=[2, 7]),
])
@pytest.mark.parametrize("deterministic", [False, True])
def test_generate_bodies_pass_sglang_gate_and_normalization(sampling, deterministic):
    api, io_struct = _sglang_api_types(), _io_struct()
    body, slots = SGLangClient.request_body([0, 2], [[1, 2, 3], [4], [5, 6]], n=4,
                                            sampling=sampling, seed=9, chunk_index=1,
                                            deterministic=deterministic)
    request = api.GenerateRequest.from_json_value(body)
    assert request.return_logprob is True
    normalized = io_struct.GenerateReqInput(**body)
    normalized.normalize_batch_and_arguments()  # SGLang's own code: raises on a bad rid
    if deterministic:  # a row per (prompt, sample), each its own seed
        assert normalized.batch_size == 8 and normalized.parallel_sample_num == 1
        seeds = [p["sampling_seed"] for p in body["sampling_params"]]
        assert len(set(seeds)) == 8
        assert body["input_ids"] == [[1, 2, 3]] * 4 + [[5, 6]] * 4
    else:  # the batch of prompts with n; no seed (SGLang would ignore it)
        assert request.input_ids == [[1, 2, 3], [5, 6]]
        assert normalized.batch_size == 2 and normalized.parallel_sample_num == 4
        assert "sampling_seed" not in body["sampling_params"]
        assert request.sampling_params.max_new_tokens == sampling.max_new_tokens
    assert len(body["rid"]) == normalized.batch_size  # one rid per prompt of the batch
    # SGLang's tokenizer manager answers prompt-major: output i * n + j is sample j of
    # prompt i (or row k of a batch with n = 1).
    assert slots == [(p, j) for p in (0, 2) for j in range(4)]


def test_sglang_refuses_the_old_rid_per_sample():
    io_struct = _io_struct()
    request = io_struct.GenerateReqInput(input_ids=[[1], [2]], sampling_params={"n": 3},
                                         rid=[f"r{i}" for i in range(6)])
    with pytest.raises(ValueError, match="rids length mismatch with the batch_size"):
        request.normalize_batch_and_arguments()


def test_gate_rejects_what_sglang_would():
    api = _sglang_api_types()
    with pytest.raises(Exception, match="bogus"):
        api.GenerateRequest.from_json_value({"input_ids": [[1]],
                                             "sampling_params": {"bogus": 1}})


def test_client_reads_prompt_major_outputs_and_refuses_another_order():
    """An SGLang answer for prompts of 4 and 3 tokens with n = 3: prompt_tokens
    [4, 4, 4, 3, 3, 3]; the old sample-major reading would score completions against the
    wrong prompt. An answer in the old order is refused."""
    def output(prompt_tokens, token):
        return {"output_ids": [token], "meta_info": {
            "prompt_tokens": prompt_tokens, "finish_reason": {"type": "length"},
            "output_token_logprobs": [[-0.5, token, None]], "weight_version": "3"}}

    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    slots = [(p, j) for p in range(2) for j in range(3)]
    sglang_order = [output(4, 10 + j) for j in range(3)] + [output(3, 20 + j) for j in range(3)]
    completions = SGLangClient._parse(sglang_order, slots, prompts)
    assert [(c.prompt_index, c.sample_index, c.token_ids[0]) for c in completions] == \
        [(0, 0, 10), (0, 1, 11), (0, 2, 12), (1, 0, 20), (1, 1, 21), (1, 2, 22)]
    old_order = [output(4, 10), output(3, 20)] * 3
    with pytest.raises(Exception, match="SGLang's order"):
        SGLangClient._parse(old_order, slots, prompts)


def test_weight_version_counts_from_the_oldest_span():
    meta = {"weight_version": "7", "weight_versions": [
        {"version": "5", "start": 0, "end": 3}, {"version": "7", "start": 3, "end": 9}]}
    assert oldest_weight_version(meta) == 5
    assert oldest_weight_version({"weight_version": "7"}) == 7
    assert oldest_weight_version({"weight_version": "default"}) is None


def test_launched_server_environment():
    """Servers launched from a torchrun worker get none of its rendezvous variables (SGLang's
    own init_process_group would meet the trainer's store), and return log-probs of the
    temperature-1 policy (SGLANG_RETURN_ORIGINAL_LOGPROB=1)."""
    worker = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
              "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True",
              "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "0", "PATH": "/bin",
              "CUDA_VISIBLE_DEVICES": "0,1"}
    env = server_environment(worker, {"OMP_NUM_THREADS": "1"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1",
                   "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}


def test_servers_of_a_node_get_their_own_gpus():
    from megatron_paced.rollout import per_server_args

    args = ["--model-path", "m", "--tp", "2"]
    assert [per_server_args(args, i)[-2:] for i in range(3)] == \
        [["--base-gpu-id", "0"], ["--base-gpu-id", "2"], ["--base-gpu-id", "4"]]
    assert per_server_args(["--tp-size=4", "--dp-size", "2", "--base-gpu-id", "8"], 1) == \
        ["--tp-size=4", "--dp-size", "2", "--base-gpu-id", "16"]
    # SGLang's compute_world_size: (1 with DP attention, else dp) x tp x pp; x --gpu-id-step.
    assert per_server_args(["--tp", "2", "--pp-size", "2"], 1)[-1] == "4"
    assert per_server_args(["--tp", "2", "--dp", "2", "--enable-dp-attention"], 1)[-1] == "2"
    assert per_server_args(["--tp", "2", "--gpu-id-step", "2"], 1)[-1] == "4"


def test_tensor_payload_is_serialized_once_per_rank():
    import torch

    from megatron_paced.rollout.weight_sync import serialize_per_rank

    shared = [("w", torch.ones(2).share_memory_())]
    payloads = serialize_per_rank(shared, 4)
    assert len(payloads) == 4
    assert len({id(p) for p in payloads}) == 4  # four picklings, not one string four times


# ---- the project's server against SGLang's behaviour -----------------------------------------


@pytest.fixture(scope="module")
def sglang_like_server(tmp_path_factory):
    from megatron_paced.rollout.sglang_client import ServerProcess, serve_command
    from megatron_paced.utils import free_port

    folder = tmp_path_factory.mktemp("sglang-like")
    tokenizer, _ = chat_tokenizer(folder / "tokenizer")
    server = ServerProcess(serve_command("--model", "tiny-llama", "--seed", "3",
                                         "--max-sequence-length", "48", "--tokenizer", tokenizer,
                                         "--debug-generate-delay", "0.4"),
                           port=free_port(), startup_timeout_s=120, api_key="k",
                           log_path=str(folder / "server.log"),
                           env={"OMP_NUM_THREADS": "1"})
    server.start()
    yield server
    server.stop()


def _raw(server, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data,
                                     method=method or ("POST" if data else "GET"),
                                     headers={"Authorization": "Bearer k",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


@pytest.mark.distributed
def test_project_server_answers_as_sglang(sglang_like_server):
    server = sglang_like_server
    # Prompt-major outputs, one rid per prompt.
    status, _, raw = _raw(server, "/generate", {
        "input_ids": [[1, 2, 3, 4], [5, 6, 7]], "rid": ["a", "b"], "return_logprob": True,
        "sampling_params": {"n": 3, "max_new_tokens": 2, "temperature": 0.5}})
    outputs = json.loads(raw)
    assert status == 200 and [o["meta_info"]["prompt_tokens"] for o in outputs] == \
        [4, 4, 4, 3, 3, 3]
    assert all(o["meta_info"]["weight_versions"][-1]["version"] ==
               o["meta_info"]["weight_version"] for o in outputs)
    # The old rule (a rid per sample) is SGLang's 400.
    status, _, raw = _raw(server, "/generate", {
        "input_ids": [[1, 2], [3]], "rid": ["a", "b", "c", "d"],
        "sampling_params": {"n": 2, "max_new_tokens": 1}})
    assert status == 400 and b"rids length mismatch" in raw
    client = SGLangClient([server], api_key="k", timeout_s=60)
    # /model_info, /server_info; seeds ignored without --enable-deterministic-inference.
    assert client.model_info(server)["weight_version"] == "default"
    assert client.server_info(server)["enable_deterministic_inference"] is False
    # /flush_cache: plain text, 400 while a request runs, 200 after.
    status, kind, raw = _raw(server, "/flush_cache")
    assert status == 200 and kind is None and raw.startswith(b"Cache flushed")  # not JSON
    assert isinstance(http_json(server.url + "/flush_cache", timeout_s=30, api_key="k"), str)
    busy = threading.Thread(target=lambda: client.generate(
        PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=2), seed=0))
    busy.start()
    time.sleep(0.15)  # the request waits out --debug-generate-delay
    status, kind, raw = _raw(server, "/flush_cache")
    busy.join()
    assert status == 400 and kind is None and b"Flush cache failed" in raw
    # A rid still in flight is refused (tokenizer_manager.py), as is a method SGLang's route
    # does not take.
    slow = threading.Thread(target=lambda: _raw(server, "/generate", {
        "input_ids": [[1, 2]], "rid": ["dup"], "sampling_params": {"max_new_tokens": 1}}))
    slow.start()
    time.sleep(0.15)
    status, _, raw = _raw(server, "/generate", {"input_ids": [[1, 2]], "rid": ["dup"]})
    slow.join()
    assert status == 400 and b"Duplicate request ID detected: dup" in raw
    assert _raw(server, "/generate", method="GET")[0] == 405
    assert _raw(server, "/model_info", {}, method="POST")[0] == 405
    # With a tokenizer, "text" prompts are tokenized as SGLang's TokenizerManager does (the
    # tokenizer's call) and outputs carry decoded "text"; both fields at once, or a
    # max_new_tokens past the context, are SGLang's 400s (io_struct.py, tokenizer_manager.py
    # _validate_one_request): refused, not capped.
    status, _, raw = _raw(server, "/generate", {"text": "what is 1 + 2 ?",
                                                "sampling_params": {"max_new_tokens": 3}})
    output = json.loads(raw)
    assert status == 200 and output["meta_info"]["prompt_tokens"] == 11, raw  # words, spaces
    assert isinstance(output["text"], str) and len(output["output_ids"]) <= 3
    status, _, raw = _raw(server, "/generate", {"text": "1", "input_ids": [1]})
    assert status == 400 and b"text and input_ids cannot be provided at the same time" in raw
    status, _, raw = _raw(server, "/generate", {"input_ids": [1] * 40,
                                                "sampling_params": {"max_new_tokens": 9}})
    assert status == 400 and b"maximum context length of 48 tokens. You requested a total " \
        b"of 49 tokens: 40 tokens from the input messages and 9 tokens" in raw
    # Tensor updates only inside the weight-update session.
    update = {"serialized_named_tensors": ["AAAA"], "weight_version": "x"}
    status, _, raw = _raw(server, "/update_weights_from_tensor", update)
    assert status == 400 and b"must run between begin_weight_update() and" in raw
    assert _raw(server, "/begin_weight_update", {})[0] == 200
    status, _, raw = _raw(server, "/begin_weight_update", {})
    assert status == 400 and b"already open" in raw
    status, _, raw = _raw(server, "/update_weights_from_tensor", update)
    assert status == 400 and b"must run between" not in raw  # now the payload is judged
    assert _raw(server, "/end_weight_update", {})[0] == 200
    assert _raw(server, "/end_weight_update", {})[0] == 400
    # One access-log line per request (not /health), without bodies or keys.
    log = open(server.log_path).read()
    assert "POST /generate 200" in log and "POST /generate 400" in log and \
        "GET /generate 405" in log
    assert "Bearer" not in log and "what is 1" not in log and "input_ids" not in log


def test_sglang_pins_agree_with_torch():
    """The sglang extra pins a supported release whose torch is the Makefile's, and the
    table of supported releases agrees with the installed wheel's own metadata."""
    import re
    from importlib.metadata import requires

    from megatron_paced.rollout.sglang_source import SUPPORTED_SGLANG, sglang_version

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup = open(os.path.join(root, "setup.py")).read()
    pinned = re.search(r'"sglang": \["sglang==([0-9.]+)"\]', setup).group(1)
    torch_spec = re.search(r"TORCH_SPEC \?= torch==([0-9.]+)",
                           open(os.path.join(root, "Makefile")).read()).group(1)
    assert SUPPORTED_SGLANG[pinned] == torch_spec
    installed = sglang_version()
    if installed is None:
        pytest.skip("sglang is not installed")
    torch_pin = [r for r in requires("sglang") if re.match(r"torch\s*==", r)]
    assert torch_pin and torch_pin[0].split("==")[1].split(";")[0].strip() == \
        SUPPORTED_SGLANG[installed], torch_pin


# ---- the trainer against a stand-in written from SGLang's source (tests/helpers) -------------


@pytest.mark.distributed
@pytest.mark.parametrize("version, weight_sync", [("0.5.21", "tensor"), ("0.5.23", "disk")])
def test_trainer_trains_against_sglang_behaviour(tmp_path, version, weight_sync):
    """paced-train attached with --sglang-url to tests/helpers/sglang_standin.py, which
    answers every arithmetic prompt with its right sum, in SGLang's order, through SGLang's
    own request normalization: every completion is scored against its own prompt (reward 1
    at every step; the old sample-major reading scored 2-3 of every 4 against another
    prompt), one rid per prompt, the weights pushed inside the weight-update session before
    each step, the cache flushed through its plain-text answer, the version checked."""
    import subprocess
    import sys

    from megatron_paced.testing.distributed import launch_workers
    from megatron_paced.utils import free_port

    _io_struct()
    port, log = free_port(), tmp_path / "requests.jsonl"
    standin = subprocess.Popen([sys.executable, "-m", "tests.helpers.sglang_standin", "--port",
                                str(port), "--version", version, "--log", str(log)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        save = tmp_path / "run"
        result = launch_workers("megatron_paced.train", nprocs=1, timeout_s=300, args=[
            "--num-prompts-per-step", "4", "--num-samples-per-prompt", "3",
            "--micro-batch-size", "6", "--task-num-prompts", "32", "--task-max-digits", "2",
            "--sft-warmup-iters", "0", "--allow-random-init", "--replay-per-step", "0",
            "--train-iters", "2", "--max-new-tokens", "6", "--save", str(save),
            "--rollout-backend", "sglang", "--sglang-url", f"http://127.0.0.1:{port}",
            "--weight-sync", weight_sync, "--rollout-prompts-per-request", "2"])
    finally:
        standin.kill()
        standin.wait()
    assert result.returncode == 0, result.output[-5000:]
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    assert [row["reward_mean"] for row in rows] == [1.0, 1.0], rows
    requests = [json.loads(line) for line in open(log)]
    generates = [r for r in requests if r["path"] == "/generate"]
    assert len(generates) == 4 and all(len(r["rid"]) == len(r["prompts"]) == 2 and r["n"] == 3
                                       for r in generates)
    assert [r["weight_version"] for r in generates] == ["0", "0", "1", "1"]
    updates = [r for r in requests if r["path"].startswith("/update_weights_from_")]
    assert {r["weight_version"] for r in updates} == {"0", "1", "2"}
    assert not any(r["flush_cache"] for r in updates)  # flushed separately, retried
    if weight_sync == "tensor":  # inside begin/end, one payload per server rank
        paths = [r["path"] for r in requests if r["path"] != "/generate"]
        first = paths.index("/begin_weight_update")
        assert paths[first + 1].startswith("/update_weights_from_tensor") and \
            "/end_weight_update" in paths[first:]
        assert all(r["entries"] == 1 and r["tensors"] >= 1 for r in updates)
    else:
        assert all(r["files"] >= 1 for r in updates)
    assert any(r["path"] == "/flush_cache" for r in requests)


def test_weight_update_session_with_and_without_the_endpoints():
    """Servers of the range open a session (begin, the updates, end, also when an update
    fails); a server without the endpoints (404) is updated without one; a session a failed
    push left open is closed and opened again."""
    import urllib.error

    from megatron_paced.rollout.weight_sync import weight_update_session

    class Client:
        def __init__(self, answers):
            self.answers, self.calls = answers, []

        def post(self, server, path, body=None):
            self.calls.append((server, path))
            code = self.answers.get((server, path))
            if code:
                self.answers.pop((server, path))  # answered once
                raise urllib.error.HTTPError(path, code, "already open" if code == 400
                                             else "Not Found", {}, None)

    client = Client({("old", "/begin_weight_update"): 404,
                     ("stuck", "/begin_weight_update"): 400})
    with pytest.raises(RuntimeError, match="update failed"):
        with weight_update_session(client, ["new", "old", "stuck"]):
            client.calls.append(("all", "update"))
            raise RuntimeError("update failed")
    assert client.calls == [("new", "/begin_weight_update"), ("old", "/begin_weight_update"),
                            ("stuck", "/begin_weight_update"), ("stuck", "/end_weight_update"),
                            ("stuck", "/begin_weight_update"), ("all", "update"),
                            ("new", "/end_weight_update"), ("stuck", "/end_weight_update")]


def test_a_retried_request_gets_fresh_rids():
    """SGLang keeps a dropped request's rid until the scheduler answers its abort and
    refuses the same rid meanwhile: each attempt of a request carries new rids."""
    def output(token):
        return {"output_ids": [token], "meta_info": {
            "prompt_tokens": 2, "finish_reason": {"type": "stop"},
            "output_token_logprobs": [[-0.1, token, None]], "weight_version": "1"}}

    client = SGLangClient(["http://127.0.0.1:9"], max_retries=2, timeout_s=5)
    bodies = []

    def post(server, path, body=None, **kwargs):
        if path != "/generate":
            return {"tp_size": 1}  # /server_info
        bodies.append(body)
        if len(bodies) == 1:
            raise ConnectionResetError("dropped")
        return [output(5), output(6)]

    client.post = post
    out = client.generate([[1, 2]], n=2, sampling=SamplingParams(), seed=0)
    assert [c.token_ids for c in out[0]] == [[5], [6]]
    assert len(bodies) == 2 and not set(bodies[0]["rid"]) & set(bodies[1]["rid"])
