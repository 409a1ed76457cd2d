"""The client's /generate bodies pass SGLang's own JSON contract gate.

SGLang's server rejects a body whose fields or types break its schema
(``sglang/api/v1/api_types.py``, ``GenerateRequest.from_json_value``). The module needs only
msgspec, so it is loaded from the installed wheel by path (``import sglang`` itself needs
CUDA and triton). Skipped, with the reason, where the wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from megatron_paced.rollout.engine import SamplingParams
from megatron_paced.rollout.sglang_client import SGLangClient


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


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    SamplingParams(temperature=0.0, max_new_tokens=3),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=64, stop_token_ids=[2, 7]),
])
def test_generate_bodies_pass_sglang_gate(sampling):
    api = _sglang_api_types()
    body = SGLangClient.request_body([0, 2], [[1, 2, 3], [4], [5, 6]], n=4, sampling=sampling,
                                     seed=9, chunk_index=1)
    request = api.GenerateRequest.from_json_value(body)
    assert request.input_ids == [[1, 2, 3], [5, 6]]
    assert request.sampling_params.n == 4 and request.return_logprob is True
    assert request.sampling_params.max_new_tokens == sampling.max_new_tokens
    assert len(request.rid) == 8


def test_gate_rejects_what_sglang_would():
    api = _sglang_api_types()
    with pytest.raises(Exception, match="bogus"):
        api.GenerateRequest.from_json_value({"input_ids": [[1]],
                                             "sampling_params": {"bogus": 1}})
