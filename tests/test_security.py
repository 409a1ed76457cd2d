"""Bad and hostile input (issue 20), tried as an attacker and a careless user would, on
loopback: the rollout server (one process, started once with a key in its environment)
answers every bad request with a 4xx and a message, runs no code from a weight payload, and
leaves its weights and weight_version unchanged by a refused update; a bounded fuzz loop
gets no 500; a crafted checkpoint ``.metadata`` runs no code in the trainer's ``--load`` or
the converter; start-up errors of the server are one line and exit 2."""

from __future__ import annotations

import base64
import http.client
import json
import os
import pickle
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch

from megatron_paced.testing.cli import CliCase, run_cli_cases
from megatron_paced.utils import free_port

KEY = "test-key-" + "x" * 24
PROMPT = [5, 9, 17, 33]
GREEDY = {"temperature": 0, "max_new_tokens": 4}
SEQ = 64
VOCAB = 512  # the tiny-llama preset's


class Marker:
    """A pickle that, if it were ever loaded by a plain unpickler, writes a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.path}",))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from megatron_paced.rollout.sglang_client import ServerProcess, serve_command

    folder = tmp_path_factory.mktemp("server")
    process = ServerProcess(serve_command("--model", "tiny-llama", "--seed", "7",
                                          "--max-sequence-length", str(SEQ),
                                          "--max-n", "8", "--max-prompts-per-request", "16",
                                          "--max-total-tokens", "4096", "--max-body-mb", "1",
                                          "--socket-timeout", "5",
                                          # the payload checks, not the session's refusal
                                          # (tests/test_sglang_contract.py)
                                          "--weight-update-session", "none"),
                            port=free_port(), startup_timeout_s=120, api_key=KEY,
                            log_path=str(folder / "server.log"),
                            env={"OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory):
    """A tiny Llama HF folder and its converted Megatron checkpoint (one conversion)."""
    from megatron_paced.testing.hf_models import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("converted")
    hf = make_tiny_hf_checkpoint(root / "hf", "llama")
    converted = run_cli_cases([CliCase("tools.convert_hf_to_megatron",
                                       ["--hf-dir", hf, "--save", str(root / "ckpt"),
                                        "--quiet"])])[0]
    assert converted.returncode == 0, converted.stderr[-2000:]
    return hf, root / "ckpt"


def request(server, path: str, body=None, *, key: str | None = KEY, raw: bytes | None = None,
            headers: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json", "Content-Length": str(len(data))}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    connection.putrequest(method, path)
    for name, value in sent.items():
        connection.putheader(name, value)
    connection.endheaders()
    if data:
        connection.send(data)
    response = connection.getresponse()
    text = response.read()
    connection.close()
    return response.status, (json.loads(text) if text else {})


def greedy_output(server) -> list[int]:
    status, answer = request(server, "/generate", {"input_ids": PROMPT,
                                                   "sampling_params": GREEDY})
    assert status == 200, answer
    return answer["output_ids"]


def version(server) -> str:
    return request(server, "/get_model_info", method="GET")[1]["weight_version"]


def tensor_payload(named: list[tuple[str, torch.Tensor]]) -> str:
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as torch_mp

    torch_mp.set_sharing_strategy("file_system")
    shared = [(name, tensor.clone().share_memory_()) for name, tensor in named]
    payload = base64.b64encode(bytes(ForkingPickler.dumps(shared))).decode()
    tensor_payload.keep = shared  # alive until the server has copied them
    return payload


def hf_shapes() -> dict[str, tuple[int, ...]]:
    from megatron_paced.models.config import PRESETS
    from megatron_paced.models.hf_mapping import hf_param_shapes

    return hf_param_shapes(PRESETS["tiny-llama"])


# (name, path, body, expected status, words of the message)
BAD_GENERATE = [
    ("booleans as tokens", {"input_ids": [True, False, True]}, 400, "is not a token id"),
    ("token past the vocabulary", {"input_ids": [1, VOCAB]}, 400, "is not a token id"),
    ("negative token", {"input_ids": [1, -3]}, 400, "is not a token id"),
    ("float token", {"input_ids": [1, 2.5]}, 400, "is not a token id"),
    ("empty prompt", {"input_ids": [[1, 2], []]}, 400, "input_ids[1] must be a non-empty"),
    ("over-long prompt", {"input_ids": [1] * SEQ}, 400, "--max-sequence-length"),
    ("n 0", {"input_ids": PROMPT, "sampling_params": {"n": 0}}, 400, "sampling_params.n 0"),
    ("n -3", {"input_ids": PROMPT, "sampling_params": {"n": -3}}, 400, "sampling_params.n -3"),
    ("n many", {"input_ids": PROMPT, "sampling_params": {"n": "many"}}, 400,
     "must be an integer"),
    ("n 2.7", {"input_ids": PROMPT, "sampling_params": {"n": 2.7}}, 400, "must be an integer"),
    ("n 1e8", {"input_ids": PROMPT, "sampling_params": {"n": 100000000}}, 400,
     "must be in [1, 8]"),
    ("max_new_tokens string", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": "8"}},
     400, "max_new_tokens must be an integer"),
    ("max_new_tokens 0", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 0}}, 400,
     "max_new_tokens 0"),
    ("stop_token_ids int", {"input_ids": PROMPT, "sampling_params": {"stop_token_ids": 3}},
     400, "stop_token_ids must be a non-empty list"),
    ("stop_token_ids string", {"input_ids": PROMPT,
                               "sampling_params": {"stop_token_ids": "abc"}}, 400,
     "stop_token_ids must be a non-empty list"),
    ("temperature -1", {"input_ids": PROMPT, "sampling_params": {"temperature": -1}}, 400,
     "temperature"),
    ("temperature NaN", {"input_ids": PROMPT, "sampling_params": {"temperature": "nan"}}, 400,
     "temperature must be a finite number"),
    ("short rid list", {"input_ids": [PROMPT, PROMPT], "rid": ["a"]}, 400,
     "rids length mismatch with the batch_size"),
    ("rid per sample", {"input_ids": [PROMPT, PROMPT], "rid": ["a", "b", "c", "d"],
                        "sampling_params": {"n": 2}}, 400,
     "rids length mismatch with the batch_size"),
    ("sampling_params string", {"input_ids": PROMPT, "sampling_params": "fast"}, 400,
     "sampling_params must be an object"),
    ("regex", {"input_ids": PROMPT, "sampling_params": {"regex": "a+"}}, 400,
     "regex: not supported"),
    ("json_schema", {"input_ids": PROMPT, "sampling_params": {"json_schema": "{}"}}, 400,
     "json_schema: not supported"),
    ("frequency_penalty", {"input_ids": PROMPT, "sampling_params": {"frequency_penalty": 1}},
     400, "frequency_penalty: not supported"),
    ("stream", {"input_ids": PROMPT, "stream": True}, 400, "stream: not supported"),
    ("text without a tokenizer", {"text": "hello"}, 400, "no tokenizer"),
    ("lora_path", {"input_ids": PROMPT, "lora_path": "/tmp"}, 400, "lora_path: not supported"),
    ("unknown field", {"input_ids": PROMPT, "temprature": 1}, 400, "unknown field"),
    ("too many prompts", {"input_ids": [PROMPT] * 17}, 413, "--max-prompts-per-request"),
    ("too many tokens", {"input_ids": [PROMPT] * 16, "sampling_params": {
        "n": 8, "max_new_tokens": 40}}, 413, "--max-total-tokens"),
    ("return_logprob string", {"input_ids": PROMPT, "return_logprob": "yes"}, 400,
     "return_logprob must be true or false"),
]


@pytest.mark.distributed
def test_bad_requests_get_a_4xx_with_a_message_and_change_nothing(server, tmp_path):
    before, start_version = greedy_output(server), version(server)
    failures = []

    def expect(name, answer, status, words):
        got, payload = answer
        message = payload.get("error", {}).get("message", "")
        if got != status or words not in message:
            failures.append((name, got, message))

    for name, body, status, words in BAD_GENERATE:
        expect(name, request(server, "/generate", body), status, words)
    # The transport: bodies, lengths, keys.
    expect("body not JSON", request(server, "/generate", raw=b"{nope"), 400, "not JSON")
    expect("body a list", request(server, "/generate", raw=b"[1, 2]"), 400, "JSON object")
    expect("negative Content-Length", request(server, "/generate", raw=b"",
                                              headers={"Content-Length": "-5"}), 400,
           "Content-Length '-5'")
    expect("huge Content-Length", request(server, "/generate", raw=b"",
                                          headers={"Content-Length": str(10 ** 12)}), 413,
           "--max-body-mb")
    expect("unknown endpoint", request(server, "/nope", {}), 404, "no endpoint")
    for path in ("/generate", "/get_server_info", "/flush_cache", "/update_weight_version"):
        expect(f"{path} without the key", request(server, path, {}, key=None), 401,
               "Authorization")
        expect(f"{path} with a wrong key", request(server, path, {}, key=KEY[:-1] + "y"), 401,
               "Authorization")
    # Weight updates refused before anything is copied.
    shapes = hf_shapes()
    good = {name: torch.zeros(shape) for name, shape in list(shapes.items())[:1]}
    marker = tmp_path / "pwned"
    code = base64.b64encode(pickle.dumps([("model.norm.weight", Marker(str(marker)))])).decode()
    expect("a pickle that runs code", request(server, "/update_weights_from_tensor", {
        "serialized_named_tensors": [code], "weight_version": "evil"}), 400, "posix.system")
    assert not marker.exists(), "the weight payload ran code on the server"
    expect("payload not base64", request(server, "/update_weights_from_tensor", {
        "serialized_named_tensors": ["%%%"]}), 400, "not base64")
    wrong_shape = [*good.items(), ("model.norm.weight", torch.ones(3))]
    expect("one wrong shape after a valid tensor", request(
        server, "/update_weights_from_tensor", {
            "serialized_named_tensors": [tensor_payload(wrong_shape)],
            "weight_version": "half"}), 400, "model.norm.weight: shape (3,)")
    expect("a layer the model does not have", request(
        server, "/update_weights_from_tensor", {
            "serialized_named_tensors": [tensor_payload(
                [("model.layers.99.input_layernorm.weight", torch.ones(64))])],
            "weight_version": "ghost"}), 400, "is not a tensor of this model")
    nan = torch.ones(shapes["model.norm.weight"])
    nan[0] = float("nan")
    expect("a NaN norm", request(server, "/update_weights_from_tensor", {
        "serialized_named_tensors": [tensor_payload([("model.norm.weight", nan)])],
        "weight_version": "nan"}), 400, "non-finite")
    from safetensors.torch import save_file

    partial = tmp_path / "only-embedding"
    partial.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(shapes["model.embed_tokens.weight"])},
              str(partial / "model.safetensors"))
    expect("a disk folder holding only the embedding", request(
        server, "/update_weights_from_disk", {"model_path": str(partial),
                                              "weight_version": "partial"}), 400, "misses")
    empty = tmp_path / "empty"
    empty.mkdir()
    answers = [request(server, "/update_weights_from_disk", {"model_path": str(path)})
               for path in (tmp_path / "does-not-exist", empty, tmp_path / "pwned.txt")]
    assert len({json.dumps(a) for a in answers}) == 1, answers  # no word on what exists
    expect("a missing folder", answers[0], 400, "is not a folder of .safetensors files")
    expect("weight_version a list", request(server, "/update_weights_from_tensor", {
        "serialized_named_tensors": [tensor_payload(list(good.items()))],
        "weight_version": [1]}), 400, "weight_version must be")
    for name, body, status, words in (
            ("master_address on all interfaces", {"master_address": "0.0.0.0",
             "master_port": 29999, "rank_offset": 1, "world_size": 2, "backend": "gloo"}, 403,
             "neither a loopback address"),
            ("port 70000", {"master_address": "127.0.0.1", "master_port": 70000,
                            "rank_offset": 1, "world_size": 2, "backend": "gloo"}, 400,
             "master_port 70000"),
            ("rank 0 (the trainer's)", {"master_address": "127.0.0.1", "master_port": 29999,
                                        "rank_offset": 0, "world_size": 2, "backend": "gloo"},
             400, "rank_offset 0"),
            ("world size a string", {"master_address": "127.0.0.1", "master_port": 29999,
                                     "rank_offset": 1, "world_size": "2", "backend": "gloo"},
             400, "world_size must be an integer")):
        expect(name, request(server, "/init_weights_update_group", body), status, words)
    expect("distributed update of an unknown tensor", request(
        server, "/update_weights_from_distributed", {
            "names": ["model.layers.99.x"], "dtypes": ["float32"], "shapes": [[1]],
            "group_name": "weight_update_group"}), 400, "weight-update group")
    assert not failures, "\n".join(map(str, failures))
    # Nothing changed: the same outputs, the same version, and the server still answers.
    assert greedy_output(server) == before and version(server) == start_version
    # A valid update still goes through (the checks refuse only what is wrong).
    status, answer = request(server, "/update_weights_from_tensor", {
        "serialized_named_tensors": [tensor_payload([("model.norm.weight",
                                                      torch.ones(shapes["model.norm.weight"])
                                                      * 1.5)])],
        "weight_version": "good"})
    assert status == 200 and version(server) == "good", answer


@pytest.mark.distributed
def test_fuzzed_bodies_never_get_a_500(server):
    """A few hundred random and mutated /generate and weight-update bodies: every answer a
    200 or a 4xx, and the server still answers afterwards."""
    rng = random.Random(0)
    seeds = [{"input_ids": PROMPT, "sampling_params": dict(GREEDY)},
             {"input_ids": [PROMPT, PROMPT[:2]], "sampling_params": {"n": 2,
                                                                     "max_new_tokens": 3}},
             {"serialized_named_tensors": ["AAAA"], "weight_version": "x"},
             {"model_path": "/tmp", "weight_version": 1},
             {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]]}]
    paths = ["/generate", "/generate", "/update_weights_from_tensor",
             "/update_weights_from_disk", "/update_weights_from_distributed"]
    values = [None, True, -1, 0, 1, 2 ** 40, 1.5, float("inf"), "", "x" * 300, [], [[]], {},
              [1, "a"], [-1], {"n": 3}, [[1, 2], 3]]

    def mutate(value):
        if isinstance(value, dict) and value and rng.random() < 0.7:
            value = dict(value)
            key = rng.choice(list(value) + ["n", "input_ids", "sampling_params", "stream"])
            value[key] = mutate(value.get(key)) if rng.random() < 0.5 else rng.choice(values)
            return value
        if isinstance(value, list) and value and rng.random() < 0.5:
            value = list(value)
            value[rng.randrange(len(value))] = rng.choice(values)
            return value
        return rng.choice(values)

    statuses = []
    for index in range(300):
        which = rng.randrange(len(seeds))
        body = mutate(seeds[which])
        if index % 10 == 0:  # raw bytes too
            raw = json.dumps(body).encode()
            cut = raw[:rng.randrange(len(raw) + 1)]
            status, _ = request(server, paths[which], raw=cut)
        else:
            status, _ = request(server, paths[which], body if isinstance(body, dict) else
                                {"input_ids": body})
        statuses.append(status)
    assert 500 not in statuses and all(s == 200 or 400 <= s < 500 for s in statuses), \
        sorted(set(statuses))
    assert request(server, "/health", method="GET", key=None)[0] == 200
    assert greedy_output(server)


def test_server_startup_errors_are_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    cases = {
        "port out of range": (["--port", "70000"], "--port 70000 must be in [0, 65535]"),
        "port in use": (["--port", port], f"--port {port}: cannot bind"),
        "missing hf dir": (["--hf-dir", str(tmp_path / "nope")], "--hf-dir"),
        "batch size 0": (["--max-batch-size", "0"], "--max-batch-size 0 must be >= 1"),
        "a host name": (["--host", "example.com"], "--host 'example.com' is not an IP"),
        "public without a key": (["--host", "0.0.0.0"], "is not a loopback address: give the "
                                                        "server a key"),
        "empty key file": (["--api-key-file", str(tmp_path / "empty")], "is empty"),
        "bad body cap": (["--max-body-mb", "nan"], "--max-body-mb nan must be a positive"),
    }
    (tmp_path / "empty").write_text("")
    results = run_cli_cases([CliCase("megatron_paced.rollout.serve",
                                     ["--model", "tiny-llama", *argv])
                             for argv, _ in cases.values()])
    busy.close()
    for (name, (_, words)), result in zip(cases.items(), results):
        assert result.returncode == 2 and words in result.stderr, (name, result.stderr[-1500:])
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            (name, result.stderr[-1500:])


def test_crafted_checkpoint_metadata_runs_no_code(converted_tiny, tmp_path):
    """A ``.metadata`` whose pickle would run a command: the trainer's --load and the
    Megatron->HF converter refuse it by name (exit 2, one line), and no command ran."""
    hf = converted_tiny[0]
    shutil.copytree(converted_tiny[1], tmp_path / "ckpt")
    metadata = tmp_path / "ckpt" / "iter_0000000" / ".metadata"
    marker = tmp_path / "pwned"
    metadata.write_bytes(pickle.dumps(Marker(str(marker))))
    # An attacker who can write the checkpoint can rewrite its checksums too.
    import hashlib

    manifest_path = metadata.parent / "checksums.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[".metadata"] = {"size": metadata.stat().st_size,
                             "sha256": hashlib.sha256(metadata.read_bytes()).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))
    results = run_cli_cases([
        CliCase("megatron_paced.train", ["--hf-config", hf, "--load", str(tmp_path / "ckpt"),
                                         "--train-iters", "1"]),
        CliCase("tools.convert_megatron_to_hf", ["--load", str(tmp_path / "ckpt"), "--save",
                                                 str(tmp_path / "back"), "--quiet"])])
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "posix.system, which is not on the allow-list" in result.stderr, \
            result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "back").exists()
    shutil.rmtree(tmp_path / "ckpt")


def test_partial_metrics_line_is_dropped_on_resume(tmp_path):
    from megatron_paced.rl.metrics import MetricsLog

    path = Path(tmp_path) / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    log = MetricsLog(str(tmp_path), is_logger=True)
    log.resume_at(2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON line"):
        log.resume_at(2)


def test_trainer_startup_errors_name_the_flag_or_file(tmp_path):
    """YAML values go through the flags' types and choices; settings that would fail at the
    first step fail at start-up; each is exit 2 with the flag or file named."""
    yamls = {"ppo.yaml": "algo: ppo\n", "backend.yaml": "rollout_backend: Embedded\n",
             "list.yaml": "[1, 2]\n", "broken.yaml": "lr: [1\n",
             "iters.yaml": "train_iters: true\n"}
    for name, text in yamls.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "a-file").write_text("x")
    cases = {
        "algo ppo in YAML": (["--config", str(tmp_path / "ppo.yaml")],
                             "algo: 'ppo' is not one of ['paced', 'grpo', 'flowrl']"),
        "backend in YAML": (["--config", str(tmp_path / "backend.yaml")],
                            "rollout_backend: 'Embedded' is not one of"),
        "YAML not a mapping": (["--config", str(tmp_path / "list.yaml")],
                               "must be a mapping of flag names to values"),
        "YAML unparsable": (["--config", str(tmp_path / "broken.yaml")],
                            "broken.yaml: line 2 not valid YAML"),
        "YAML bool for an int": (["--config", str(tmp_path / "iters.yaml")],
                                 "train_iters: True is not a value of --train-iters"),
        "YAML missing": (["--config", str(tmp_path / "missing.yaml")],
                         "missing.yaml: No such file or directory"),
        "temperature -1": (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        "max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
        "save names a file": (["--save", str(tmp_path / "a-file")], "names a file"),
        "save-interval -1": (["--save-interval", "-1"], "--save-interval -1: must be >= 0"),
        "eval of 0 prompts": (["--eval-interval", "1", "--eval-num-prompts", "0"],
                              "--eval-num-prompts 0: must be >= 1"),
        # SGLang's log-probs are of the temperature-scaled logits unless the attached
        # servers run with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (layers/sampler.py).
        "engine anchor at T 0.7 from attached servers": (
            ["--rollout-backend", "sglang", "--sglang-url", "http://127.0.0.1:9",
             "--temperature", "0.7", "--old-log-probs", "engine"],
            "--sglang-original-logprobs False: --old-log-probs engine at --temperature 0.7"),
        "disk sync on two nodes without a shared folder": (
            ["--rollout-backend", "sglang", "--weight-sync", "disk"],
            "needs --weight-sync-dir"),
    }
    two_nodes = {"disk sync on two nodes without a shared folder"}  # GROUP_WORLD_SIZE 2
    results = run_cli_cases([CliCase("megatron_paced.train", ["--allow-random-init", *argv],
                                     env={"GROUP_WORLD_SIZE": "2"} if name in two_nodes else {})
                             for name, (argv, _) in cases.items()])
    for (name, (_, words)), result in zip(cases.items(), results):
        assert result.returncode == 2 and words in result.stderr, (name, result.stderr[-1500:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-1500:])


@pytest.mark.parametrize("rows, words", [
    ([{"prompt": "a", "answer": "1", "prompt_id": 1.1},
      {"prompt": "b", "answer": "2", "prompt_id": 1.2}], "prompt_id 1.1 is not an integer"),
    ([{"prompt": "a", "answer": ["1", "2"]}], "'answer' is a list"),
    ([{"prompt": {"text": "a"}, "answer": "1"}], "'prompt' is a dict"),
    ([{"prompt": "a", "answer": "1", "prompt_id": True}], "prompt_id True is not an integer"),
])
def test_prompt_file_values_of_the_wrong_kind_are_errors(tmp_path, rows, words):
    from megatron_paced.data import DataError, load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=words.replace("[", r"\[").replace(".", r"\.")):
        load_prompts(str(path))


def test_converter_bad_input_is_named_before_writing(tmp_path):
    """Converters: a truncated shard, a config.json that is no JSON or no object, an index
    that points outside --hf-dir, --max-shard-gb nan: exit 2, one named error, nothing
    written."""
    from megatron_paced.testing.hf_models import make_tiny_hf_checkpoint

    source = Path(make_tiny_hf_checkpoint(tmp_path / "hf", "qwen2"))
    folders = {}

    def variant(name):
        folders[name] = tmp_path / name
        shutil.copytree(source, folders[name])
        return folders[name]

    shard = sorted(variant("truncated").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    (variant("config-not-json") / "config.json").write_text("{oops")
    (variant("config-a-list") / "config.json").write_text("[1]")
    outside = variant("outside")
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../hf/" + index["weight_map"][first]
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = {"truncated": f"{shard.name} is not a complete safetensors file",
                "config-not-json": "config.json is not valid JSON",
                "config-a-list": "config.json is not a JSON object",
                "outside": "outside the folder"}
    cases = [CliCase("tools.convert_hf_to_megatron", ["--hf-dir", str(folders[name]),
                                                       "--save", str(tmp_path / f"out-{name}")])
             for name in expected]
    cases.append(CliCase("tools.convert_megatron_to_hf", ["--load", str(tmp_path), "--save",
                                                          str(tmp_path / "out-nan"),
                                                          "--max-shard-gb", "nan"]))
    results = run_cli_cases(cases)
    for (name, words), result in zip([*expected.items(), ("nan", "--max-shard-gb nan")],
                                     results):
        assert result.returncode == 2 and words in result.stderr, (name, result.stderr[-1500:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-1500:])
        assert not (tmp_path / f"out-{name}").exists(), name


def test_damaged_checkpoints_are_named_with_the_newest_intact_iteration(converted_tiny,
                                                                         tmp_path):
    """Two iterations (the converter's iteration 0, copied as iteration 1); the newer one
    damaged in each way: flipped bytes in a .distcp, a truncated .metadata, a
    garbled or empty ``latest``, ``latest`` pointing at no folder. --load fails at start-up
    with the problem and the intact iteration named; the files are left as they were."""
    hf, ckpt = converted_tiny[0], tmp_path / "ckpt"
    shutil.copytree(converted_tiny[1], ckpt)
    shutil.copytree(ckpt / "iter_0000000", ckpt / "iter_0000001")  # checksums stay valid
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")

    def flip(root: Path) -> None:
        distcp = sorted((root / "iter_0000001").glob("*.distcp"))[0]
        data = bytearray(distcp.read_bytes())
        for i in range(min(4096, len(data))):
            data[i] ^= 0xFF
        distcp.write_bytes(bytes(data))

    def truncate(root: Path) -> None:
        metadata = root / "iter_0000001" / ".metadata"
        metadata.write_bytes(metadata.read_bytes()[:50])

    def set_latest(text: str):
        return lambda root: (root / "latest_checkpointed_iteration.txt").write_text(text)

    damages = {
        "flipped bytes": (flip, ".distcp does not match its checksum"),
        "truncated .metadata": (truncate, ".metadata has 50 bytes"),
        "garbled latest": (set_latest("x9"), "holds 'x9', not an iteration"),
        "empty latest": (set_latest(""), "holds '', not an iteration"),
        "latest at no folder": (set_latest("7"), "points at iteration 7"),
    }
    roots, before = {}, {}
    for index, (name, (damage, _)) in enumerate(damages.items()):
        roots[name] = tmp_path / f"damaged-{index}"
        shutil.copytree(ckpt, roots[name])
        damage(roots[name])
        before[name] = sorted((str(p), p.stat().st_size) for p in roots[name].rglob("*"))
    results = run_cli_cases([CliCase("megatron_paced.train", [
        "--hf-config", hf, "--load", str(roots[name]), "--train-iters", "1"])
        for name in damages])
    for (name, (_, words)), result in zip(damages.items(), results):
        assert result.returncode == 2 and words in result.stderr, (name, result.stderr[-1500:])
        intact = "iter_0000001" if "latest" in name else "iter_0000000"
        assert f"the newest intact iteration is {intact}" in result.stderr, \
            (name, result.stderr[-1500:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-1500:])
        assert sorted((str(p), p.stat().st_size) for p in roots[name].rglob("*")) == \
            before[name], name


def test_two_runs_on_one_master_port_fail_in_one_line():
    """The launch scripts check MASTER_PORT on the node that hosts torchrun's store."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    try:
        for script in ("examples/tiny_cpu.sh", "examples/qwen2.5_1.5b_math.sh"):
            result = subprocess.run(["bash", script], cwd=repo, capture_output=True, text=True,
                                    timeout=60, env={**env, "MASTER_PORT": port,
                                                     "NNODES": "1", "HF_DIR": "/nonexistent",
                                                     "MEGATRON_CKPT": "/nonexistent"})
            assert result.returncode == 2, (script, result.stderr[-1500:])
            assert result.stderr.strip() == (f"error: MASTER_PORT {port} is in use on this "
                                             "machine (another run?): set MASTER_PORT to a "
                                             "free port"), (script, result.stderr[-1500:])
    finally:
        busy.close()


def test_a_failed_launch_ends_in_one_line_without_the_environment_activated(tmp_path):
    """examples/tiny_cpu.sh finds paced-run in the repository's .venv with nothing activated;
    a layout error prints once (not once per process) and the launcher adds one line, where
    torchrun prints its traceback and a table of ranks."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".venv" / "bin" / "paced-run").exists():
        pytest.skip("needs make install's .venv")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "VIRTUAL_ENV", "CONDA"))}
    result = subprocess.run(["bash", "examples/tiny_cpu.sh", "--tensor-model-parallel-size",
                             "3", "--save", str(tmp_path / "run")], cwd=repo,
                            capture_output=True, text=True, timeout=120,
                            env={**env, "PATH": "/usr/bin:/bin", "NNODES": "1",
                                 "MASTER_PORT": str(free_port())})
    assert result.returncode == 2, result.stderr[-2000:]
    error, launcher = result.stderr.splitlines()  # exactly two lines
    assert error == ("paced-train: error: world size 2 is not divisible by "
                     "--tensor-model-parallel-size 3 x --pipeline-model-parallel-size 1 = 3")
    # Whichever process exits first is reported; the agent stops the other.
    assert launcher in [f"paced-run: megatron_paced.train failed: rank {rank} exited with code "
                        "2 (a usage or configuration error, above) (1 other process stopped)"
                        for rank in (0, 1)], result.stderr[-2000:]
    assert "Traceback" not in result.stdout


def test_the_launcher_line_reads_torchs_own_failure_records(tmp_path, monkeypatch):
    """paced-run's line from torch's ProcessFailure: an error file written by torch's own
    ErrorHandler (what @record writes), a signal, and a plain exit code
    (torch/distributed/elastic/multiprocessing/errors/__init__.py)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    from megatron_paced.launch import failure_line

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise ValueError("shard 3 is missing\nsecond line")
    except ValueError as err:
        ErrorHandler().record_exception(err)
    crashed = ProcessFailure(local_rank=1, pid=11, exitcode=1, error_file=str(error_file))
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file="/nonexistent")
    line, code = failure_line("megatron_paced.train", {0: stopped, 1: crashed})
    assert (line, code) == ("paced-run: megatron_paced.train failed: rank 1 exited with code 1 "
                            "(ValueError: shard 3 is missing) (1 other process stopped)", 1)
    killed = ProcessFailure(local_rank=0, pid=12, exitcode=-9, error_file="/nonexistent")
    assert failure_line("m", {4: killed}) == (
        "paced-run: m failed: rank 4 was killed by SIGKILL (out of memory?)", 137)
    nonfinite = ProcessFailure(local_rank=0, pid=13, exitcode=3, error_file="/nonexistent")
    assert failure_line("m", {0: nonfinite, 1: stopped})[0] == (
        "paced-run: m failed: rank 0 exited with code 3 (a non-finite loss, above) (1 other "
        "process stopped)")


def test_the_server_lock_serves_requests_in_arrival_order():
    """Fair scheduling: waiters get the model in the order they asked, and a thread that
    releases it cannot jump the queue."""
    import threading
    import time

    from megatron_paced.rollout.service import FairLock

    lock, order, arrived = FairLock(), [], []

    def request(index: int) -> None:
        arrived.append(index)
        with lock:
            order.append(index)

    with lock:  # held while 8 requests queue up, one after another
        threads = []
        for index in range(8):
            threads.append(threading.Thread(target=request, args=(index,)))
            threads[-1].start()
            while lock._next_ticket < index + 2:  # this one has taken its ticket
                time.sleep(0.001)
        with_the_lock_again = threading.Thread(target=request, args=(99,))
    with_the_lock_again.start()  # asks after all 8: served last
    for thread in [*threads, with_the_lock_again]:
        thread.join(timeout=10)
    assert order == [*range(8), 99]
