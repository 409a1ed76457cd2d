"""The CPU compatibility layer's contract, checked in a fresh process."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_python

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is for CPU-only hosts")


@pytest.fixture(scope="module")
def layer_checks():
    """The layer's contract, every check in ONE fresh process (Megatron takes seconds to
    import): the child prints one ``name ok`` line per check that passed."""
    result = run_python("""
        import torch
        real_compile = torch.compile
        from megatron_paced.compat import enable_cpu_compat, is_cpu_compat_enabled
        assert not is_cpu_compat_enabled()
        try:
            torch.empty(2, device="cuda")
            raise SystemExit("CUDA allocation worked before the layer was on")
        except (RuntimeError, AssertionError):
            pass
        assert enable_cpu_compat() and enable_cpu_compat()  # on, and idempotent
        assert not torch.cuda.is_available()                # stays honest
        for device in ("cuda", "cuda:0", torch.device("cuda"), torch.cuda.current_device()):
            assert torch.zeros(3, device=device).device.type == "cpu", device
        t = torch.ones(2)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor" and t.type(torch.float64).dtype == torch.float64
        assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        s = torch.cuda.Stream(); e = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            e.record(); s.wait_stream(torch.cuda.current_stream()); torch.cuda.synchronize()
        print("redirects ok")

        # Item 5: Megatron imported with its torch.compile'd kernels left as plain functions,
        # and torch.compile itself again afterwards.
        import sys
        from megatron.core.fusions import fused_bias_swiglu
        assert torch.compile is real_compile
        assert not hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable")
        assert "torch._inductor.compile_fx" not in sys.modules
        print("compile ok")

        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.reset()
        torch.manual_seed(0)
        tracker.add("model-parallel-rng", 1234)
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before)   # default stream restored
        with tracker.fork():
            b = torch.rand(4)
        assert not torch.equal(a, b)                         # the tracked stream advanced
        torch.manual_seed(1234)
        assert torch.equal(a, torch.rand(4))                 # and started from its seed
        print("rng ok")
    """)
    return result


@pytest.mark.parametrize("name", ["redirects", "compile", "rng"])
def test_layer_contract(layer_checks, name):
    """redirects: off until enabled, then CUDA devices, types and streams map to the CPU;
    compile: Megatron's torch.compile'd kernels stay plain functions, torch.compile restored;
    rng: Megatron's RNG tracker forks real generator states."""
    assert f"{name} ok" in layer_checks.stdout, layer_checks.stderr[-3000:]
