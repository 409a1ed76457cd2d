"""Allow-list unpickling: bytes from a request or a checkpoint never run code.

A pickle can call any importable function while it loads (``os.system`` included). Two kinds
of bytes reach an unpickler in this project, and both now go through an allow-list of the
globals they may name; anything else raises :class:`UnsafePickleError` naming the global:

* a weight payload of ``/update_weights_from_tensor`` (torch's multiprocessing pickler:
  shared-memory or CUDA IPC handles): :func:`loads_weight_payload` admits only torch's
  tensor and storage rebuild functions, ``torch.Tensor``, ``torch.Size``, the storage classes
  and dtypes, and returns a list of ``(name, tensor)`` pairs or raises;
* the ``.metadata`` file of a torch distributed checkpoint (read by Megatron's
  ``dist_checkpointing`` through ``torch.distributed.checkpoint.FileSystemReader`` with a
  plain ``pickle.load``) and its byte items (``torch.load(weights_only=False)``):
  :func:`install_checkpoint_allow_list` switches both to the allow-list below, once per
  process (``patches/README.md``, item 3).

Usage::

    named = loads_weight_payload(base64.b64decode(body["serialized_named_tensors"][0]))
    install_checkpoint_allow_list()       # before dist_checkpointing.load / dcp.load
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import threading

import torch

_REDUCTIONS = "torch.multiprocessing.reductions"
WEIGHT_PAYLOAD_GLOBALS = {
    (_REDUCTIONS, name) for name in (
        "rebuild_tensor", "rebuild_storage_filename", "rebuild_typed_storage",
        "rebuild_typed_storage_child", "rebuild_storage_empty", "rebuild_cuda_tensor")
} | {("torch", "Tensor"), ("torch", "Size"), ("torch.storage", "UntypedStorage"),
     ("torch.storage", "TypedStorage"), ("torch", "device")}

_CHECKPOINT_MODULES = ("torch.distributed.checkpoint.metadata",
                       "torch.distributed.checkpoint.planner",
                       "torch.distributed.checkpoint.filesystem")
CHECKPOINT_GLOBALS = {("torch", "Size"), ("torch", "device"),
                      ("torch.serialization", "_get_layout"),
                      ("collections", "OrderedDict"), ("builtins", "set"),
                      ("builtins", "frozenset"), ("builtins", "slice")}


class UnsafePickleError(pickle.UnpicklingError):
    """The bytes name a global outside the allow-list (or are not a pickle at all)."""


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _is_checkpoint_type(module: str, name: str) -> bool:
    """A dataclass or enum defined in torch's distributed-checkpoint metadata modules."""
    if module not in _CHECKPOINT_MODULES:
        return False
    import importlib

    value = getattr(importlib.import_module(module), name, None)
    return isinstance(value, type) and (dataclasses.is_dataclass(value)
                                        or issubclass(value, enum.Enum))


def _is_layout_or_format(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.layout, torch.memory_format))


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed, what: str) -> None:
        super().__init__(file)
        self._allowed, self._what = allowed, what

    def find_class(self, module: str, name: str):
        if self._allowed(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self._what} names {module}.{name}, which is not on the "
                                "allow-list: refusing to load it")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._what} holds a persistent id, which is not allowed")


def _weight_payload_global(module: str, name: str) -> bool:
    return (module, name) in WEIGHT_PAYLOAD_GLOBALS or _is_dtype(module, name)


def _checkpoint_global(module: str, name: str) -> bool:
    return ((module, name) in CHECKPOINT_GLOBALS or _is_dtype(module, name)
            or _is_layout_or_format(module, name) or _is_checkpoint_type(module, name))


def loads_weight_payload(data: bytes) -> list[tuple[str, torch.Tensor]]:
    """A ``serialized_named_tensors`` entry -> ``[(name, tensor), ...]``; raises
    :class:`UnsafePickleError` for a global outside the allow-list, bytes that are no pickle,
    or anything but a list of (str, tensor) pairs."""
    try:
        value = _AllowListUnpickler(io.BytesIO(data), _weight_payload_global,
                                    "the weight payload").load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed pickle is one kind of error
        raise UnsafePickleError(f"the weight payload is not a valid tensor pickle "
                                f"({type(err).__name__}: {err})") from None
    if not (isinstance(value, list) and value and all(
            isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor) for item in value)):
        raise UnsafePickleError("the weight payload must be a non-empty list of "
                                "(name, tensor) pairs")
    return value


def load_checkpoint_pickle(file, what: str = "a checkpoint's .metadata"):
    """``pickle.load`` for checkpoint metadata, with the allow-list."""
    return _AllowListUnpickler(file, _checkpoint_global, what).load()


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside ``torch.distributed.checkpoint.filesystem``:
    ``load`` goes through the allow-list, everything else (``dump`` ...) is pickle's own."""

    def load(self, file, **kwargs):
        name = getattr(file, "name", None)
        return load_checkpoint_pickle(file, f"checkpoint metadata {name}" if name else
                                      "a checkpoint's .metadata")

    def loads(self, data, **kwargs):
        return load_checkpoint_pickle(io.BytesIO(data))

    def __getattr__(self, name: str):
        return getattr(pickle, name)


def _load_bytes_weights_only(self, read_item, value) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``torch.load(weights_only=True)``: a checkpoint's
    byte items (Megatron's ``_extra_state``, sharded objects) hold data, never code."""
    from torch.distributed.checkpoint.default_planner import set_element

    loaded = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


_install_lock = threading.Lock()
_installed = False


def install_checkpoint_allow_list() -> None:
    """Make torch's distributed-checkpoint reader unpickle ``.metadata`` and byte items
    through the allow-list, for the rest of the process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from torch.distributed.checkpoint import default_planner, filesystem

        filesystem.pickle = _RestrictedPickleModule()
        default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
        _installed = True
