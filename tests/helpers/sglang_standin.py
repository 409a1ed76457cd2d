"""An SGLang stand-in written from SGLang's source, not from the project's server or client:
the trainer's check that it trains against SGLang's behaviour.

It answers the arithmetic task (the character tokenizer of
``megatron_paced/tasks/arithmetic.py``) with the right sum of every prompt, so a run whose
completions are all scored against their own prompts has reward 1 at every step; one that
reads the outputs in another order scores sums against the wrong prompts. What it does, and
where SGLang does it (0.5.21 and 0.5.23 wheels):

* ``/generate``: the body is normalized by SGLang's own
  ``GenerateReqInput.normalize_batch_and_arguments`` executed from the installed wheel
  (``srt/managers/io_struct.py``): a ``rid`` list as long as the batch, else 400; outputs
  prompt-major (``srt/managers/tokenizer_manager.py`` ``_handle_batch_request``: for each
  prompt, its ``n`` samples), each with ``meta_info`` ``prompt_tokens``,
  ``output_token_logprobs`` triples, ``finish_reason``, ``weight_version`` and
  ``weight_versions`` spans (``srt/utils/weight_versions.py``).
* ``/flush_cache``: plain text (``srt/entrypoints/http_server.py``).
* ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``: refused outside
  ``/begin_weight_update`` ... ``/end_weight_update``
  (``srt/managers/scheduler_components/weight_updater.py``); an update with
  ``flush_cache: true`` while requests run: 0.5.23 answers 400, 0.5.21 asserts in its
  scheduler (here: the server exits, as a crashed scheduler takes the server down).
* ``serialized_named_tensors[r]`` is TP rank r's (``srt/managers/tp_worker.py``
  ``deserialize_own_rank``): a list of ``tp_size`` entries, each unpickled.
* ``/model_info`` and ``/get_model_info``, ``/server_info`` and ``/get_server_info``.

Every request is logged as a JSON line to ``--log`` for the test to read.

    python -m tests.helpers.sglang_standin --port 30000 --version 0.5.23 --log requests.jsonl
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ALPHABET = "0123456789+-=*"  # ids 3.. ; 0 pad, 1 bos, 2 eos (arithmetic.CharTokenizer)
EOS = 2


def answer_tokens(prompt_ids: list[int]) -> list[int]:
    """The right answer of an arithmetic prompt, as tokens, then the end token."""
    text = "".join(ALPHABET[i - 3] for i in prompt_ids if i >= 3).rstrip("=")
    op = "*" if "*" in text else "+"
    a, b = text.split(op)
    result = int(a) * int(b) if op == "*" else int(a) + int(b)
    return [ALPHABET.index(ch) + 3 for ch in str(result)] + [EOS]


class StandIn:
    def __init__(self, version: str, log_path: str, tp_size: int) -> None:
        from megatron_paced.rollout.sglang_source import load_io_struct

        self.io_struct = load_io_struct()
        if self.io_struct is None:
            raise SystemExit("the sglang wheel's io_struct could not be loaded")
        self.version = version
        self.tp_size = tp_size
        self.weight_version = "default"
        self.session = False
        self.active = 0
        self.lock = threading.Lock()
        self.log = open(log_path, "a")

    def record(self, **entry) -> None:
        with self.lock:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()

    def generate(self, body: dict):
        request = self.io_struct.GenerateReqInput(**body)
        request.normalize_batch_and_arguments()  # SGLang's ValueError is a 400
        n = request.parallel_sample_num
        prompts = request.input_ids[:request.batch_size]  # expanded n times after these
        outputs = []
        for prompt in prompts:  # tokenizer_manager: for i in batch: for _ in range(n)
            for _ in range(n):
                tokens = answer_tokens(prompt)
                outputs.append({"text": "", "output_ids": tokens, "meta_info": {
                    "id": uuid.uuid4().hex, "prompt_tokens": len(prompt),
                    "completion_tokens": len(tokens), "cached_tokens": 0,
                    "finish_reason": {"type": "stop", "matched": EOS},
                    "output_token_logprobs": [[-0.1, t, None] for t in tokens],
                    "weight_version": self.weight_version,
                    "weight_versions": [{"version": self.weight_version, "start": 0,
                                         "end": len(tokens)}]}})
        self.record(path="/generate", rid=body.get("rid"), prompts=prompts, n=n,
                    weight_version=self.weight_version)
        return outputs[0] if request.is_single and n == 1 else outputs

    def update(self, path: str, body: dict):
        if path != "/update_weights_from_disk" and not self.session:
            return 400, {"success": False, "message": f"{path.strip('/')} must run between "
                                                      "begin_weight_update() and "
                                                      "end_weight_update()"}
        if path == "/update_weights_from_distributed":
            return 400, {"success": False, "message": "this stand-in has no update group"}
        if path == "/update_weights_from_disk":
            files = [f for f in os.listdir(body["model_path"]) if f.endswith(".safetensors")]
            detail = {"files": len(files)}
        else:
            payloads = body["serialized_named_tensors"]
            named = pickle.loads(base64.b64decode(payloads[0]))  # rank 0's entry
            detail = {"entries": len(payloads), "tensors": len(named)}
        if body.get("flush_cache", True) and self.active:
            if self.version == "0.5.21":  # assert flush_cache_success, in the scheduler
                self.record(path=path, crashed=True)
                os._exit(1)
            return 400, {"success": False, "message": "Weights were updated, but the cache "
                                                      "was not flushed"}
        if body.get("weight_version") is not None:
            self.weight_version = body["weight_version"]
        self.record(path=path, weight_version=body.get("weight_version"),
                    flush_cache=body.get("flush_cache", True), **detail)
        return 200, {"success": True, "message": "Success"}


def make_handler(standin: StandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, payload, text: bool = False) -> None:
            data = payload.encode() if text else json.dumps(payload).encode()
            self.send_response(status)
            if not text:  # SGLang's Response(content=...) sets no JSON type
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.route()

        def do_POST(self) -> None:
            self.route()

        def route(self) -> None:
            path = self.path.split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            if path.startswith("/health"):
                return self.reply(200, {})
            if path == "/generate":
                standin.active += 1
                try:
                    return self.reply(200, standin.generate(body))
                except (ValueError, TypeError) as err:
                    return self.reply(400, {"error": {"message": str(err)}})
                finally:
                    standin.active -= 1
            if path == "/flush_cache":
                standin.record(path=path)
                return self.reply(200, "Cache flushed.\nPlease check backend logs for more "
                                       "details.\n", text=True)
            if path in ("/model_info", "/get_model_info"):
                return self.reply(200, {"model_path": "stand-in", "is_generation": True,
                                        "weight_version": standin.weight_version})
            if path in ("/server_info", "/get_server_info"):
                return self.reply(200, {"tp_size": standin.tp_size, "dp_size": 1,
                                        "enable_deterministic_inference": False,
                                        "version": standin.version})
            if path == "/begin_weight_update":
                if standin.session:
                    return self.reply(400, {"success": False, "message": "a weight-update "
                                            "session is already open"})
                standin.session = True
                standin.record(path=path)
                return self.reply(200, {"success": True, "message": "Success"})
            if path == "/end_weight_update":
                if not standin.session:
                    return self.reply(400, {"success": False, "message": "no weight-update "
                                            "session is open"})
                standin.session = False
                standin.record(path=path)
                return self.reply(200, {"success": True, "message": "Success"})
            if path.startswith("/update_weights_from_"):
                return self.reply(*standin.update(path, body))
            if path in ("/pause_generation", "/continue_generation"):
                return self.reply(200, {"message": "ok", "status": "ok"})
            self.reply(404, {"detail": "Not Found"})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version", choices=["0.5.21", "0.5.23"], default="0.5.23")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--log", required=True)
    args, _ = parser.parse_known_args()
    import torch.multiprocessing as torch_mp

    torch_mp.set_sharing_strategy("file_system")
    standin = StandIn(args.version, args.log, args.tp_size)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(standin))
    print(f"SGLang {args.version} stand-in on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
