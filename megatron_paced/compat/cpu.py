"""Run Megatron-Core on a machine without CUDA.

Megatron-Core assumes CUDA in many places: ``device="cuda"`` and
``device=torch.cuda.current_device()`` in factory calls, ``tensor.cuda()``, the CUDA RNG
tracker of tensor parallelism, CUDA streams and events around communication, and
``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizer and grad clipping.
This module redirects all of that to the CPU, so that the *unmodified* parallel state
(gloo), ``GPTModel``, the pipeline schedules, ``DistributedDataParallel``, the distributed
optimizer and ``dist_checkpointing`` run on a laptop or a CI box.

Contract
    * Nothing happens on import. :func:`enable_cpu_compat` switches the layer on, and only
      when ``torch.cuda.is_available()`` is False; on a GPU machine it returns False and
      changes nothing.
    * Once on, it stays on for the life of the process (Megatron keeps references to the
      patched functions). It is idempotent.
    * What it does, in full (also listed in ``patches/README.md``):
        1. A global ``TorchFunctionMode`` that rewrites any CUDA device argument
           (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` or a bare integer index) to
           ``"cpu"``, turns ``Tensor.cuda()`` into a no-op and ``Tensor.pin_memory()`` into
           identity, and makes a no-argument ``Tensor.type()`` report the CUDA type name
           that Megatron's dtype checks expect (``torch.FloatTensor`` ->
           ``torch.cuda.FloatTensor``).
        2. ``torch.cuda`` stand-ins: ``current_device`` (0), ``synchronize``,
           ``device_count`` (1), ``set_device``, ``Stream``/``Event``/``current_stream``/
           ``stream``/``default_stream`` (synchronous no-ops: the CPU runs in order), NVTX
           ranges (no-ops), and the RNG calls (``get_rng_state``/``set_rng_state``/
           ``manual_seed``/``manual_seed_all``) mapped to the CPU default generator.
        3. Megatron's private CUDA RNG helpers ``tensor_parallel.random._get_cuda_rng_state``
           and ``_set_cuda_rng_state`` mapped to the CPU generator, so that the
           ``CudaRNGStatesTracker`` forks and restores real generator states (without this
           a CPU build of torch silently queues the state change and never applies it).
        4. Megatron's activation-recompute backward (``tensor_parallel.CheckpointFunction``,
           used by ``--recompute-granularity``) re-runs the forward inside autograd's
           backward, where the mode of item 1 is not in force: it runs under the mode again.
        5. While Megatron-Core is first imported (by this call), ``torch.compile`` returns
           the function it is given: Megatron decorates its fused kernels (bias-GeLU,
           SwiGLU, RoPE, ...) with ``torch.compile`` at import, and the first such call
           imports TorchDynamo and Inductor, 2.4 s of every process's start on this CPU.
           Those kernels are off here (fusions are disabled on the CPU), and a function
           that is called anyway runs eagerly, with the same math. ``torch.compile`` is
           itself again as soon as the import returns.
    * ``torch.cuda.is_available()`` keeps answering False, so code that branches on it stays
      honest.
    * Torch function modes are per thread: the thread that calls :func:`enable_cpu_compat`
      gets the device redirection; another thread that runs Megatron code (an HTTP handler of
      the rollout server) wraps that code in ``with cpu_compat_in_this_thread():``.

Usage::

    from megatron_paced.compat import enable_cpu_compat
    enable_cpu_compat()                      # before building any Megatron object
    from megatron.core import parallel_state
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)

Checked against megatron-core 0.16.1 (Python 3.11) with torch 2.13 (CPU build).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None
_THREAD = threading.local()  # .active: this thread runs under the redirecting mode

_CPU = torch.device("cpu")

# Tensor.type() names that Megatron compares against, keyed by the CPU names.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call in this process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _Stream:
    """A CUDA stream stand-in: the CPU executes in program order, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event if event is not None else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Event:
    """A CUDA event stand-in that records wall-clock time, so elapsed_time still means something."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._time_s: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._time_s = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        if self._time_s is None or end._time_s is None:
            return 0.0
        return (end._time_s - self._time_s) * 1000.0


_DEFAULT_STREAM = _Stream()


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _install_cuda_standins() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.random.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.random.manual_seed = cuda.manual_seed
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0
    cuda.nvtx.range = lambda msg, *args, **kwargs: contextlib.nullcontext()


@contextlib.contextmanager
def _torch_compile_returns_its_argument() -> Iterator[None]:
    """Item 5 of the contract: ``torch.compile(fn)`` and ``@torch.compile(...)`` give back
    the function unchanged for the duration of the body."""
    real = torch.compile

    def eager(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager
    try:
        yield
    finally:
        torch.compile = real


def _import_megatron_core() -> None:
    if "megatron.core" in sys.modules:
        return
    with _torch_compile_returns_its_argument():
        import megatron.core  # noqa: F401  (the decorators run here)


def _install_megatron_rng_helpers() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _get_cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state


def _install_megatron_recompute_backward() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    recompute_backward = tp_random.CheckpointFunction.backward

    def backward(ctx, *args):
        with _CudaToCpuMode():
            return recompute_backward(ctx, *args)

    tp_random.CheckpointFunction.backward = staticmethod(backward)


def enable_cpu_compat() -> bool:
    """Switch the CPU compatibility layer on if CUDA is absent.

    Returns True when the layer is active (now or from an earlier call), False on a machine
    with CUDA, where nothing is changed.
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _install_cuda_standins()
    _import_megatron_core()
    _install_megatron_rng_helpers()
    _install_megatron_recompute_backward()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays on for the life of the process (in this thread)
    _THREAD.active = True
    _ENABLED = True
    return True


@contextlib.contextmanager
def cpu_compat_in_this_thread() -> Iterator[None]:
    """Run the body under the CUDA-to-CPU redirection in the current thread (a no-op where the
    layer is off or the thread already has it)."""
    if not _ENABLED or getattr(_THREAD, "active", False):
        yield
        return
    _THREAD.active = True
    try:
        with _CudaToCpuMode():
            yield
    finally:
        _THREAD.active = False


def is_cpu_compat_enabled() -> bool:
    """Whether :func:`enable_cpu_compat` switched the layer on in this process."""
    return _ENABLED
