"""SGLang's own request classes, run from the installed wheel on a machine that cannot import
SGLang (its kernels need CUDA, and ``import sglang.srt`` pulls them in).

``sglang/srt/managers/io_struct.py`` holds ``GenerateReqInput``, whose
``normalize_batch_and_arguments`` is the code that decides what a ``/generate`` body means:
the batch size, the ``n`` expansion and the rule for ``rid`` (a list has one entry per
prompt, ``_normalize_rid``). The dataclass itself needs only the standard library, msgspec,
numpy and torch; the rest of what the file imports (the scheduler's types, zmq, SGLang's
utilities) is used in type annotations or in other classes. :func:`load_io_struct` executes
the wheel's file with those imports answered by inert placeholders, so the normalization that
runs is SGLang's own source, not a copy of it. Where the wheel is missing, or a release moves
the class, it returns None and callers fall back to the rule written from that source
(:mod:`megatron_paced.rollout.requests`).

Usage::

    io_struct = load_io_struct()
    if io_struct is not None:
        request = io_struct.GenerateReqInput(**body)
        request.normalize_batch_and_arguments()      # ValueError: SGLang's 400
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import importlib.util
import os
import sys
import types

SUPPORTED_SGLANG = {"0.5.21": "2.13.0", "0.5.22": "2.14.1", "0.5.23": "2.14.1"}
"""The SGLang releases the client is written against (their source read for every rule it
follows), each with the torch its wheel pins (``Requires-Dist: torch==``)."""
MODULE_NAME = "sglang_io_struct_from_wheel"
REAL_MODULES = ("torch", "numpy", "msgspec", "pydantic", "typing", "dataclasses", "uuid",
                "copy", "logging", "pickle", "array", "collections", "enum", "__future__")


class _Placeholder:
    """Stands for anything io_struct imports but GenerateReqInput's normalization does not
    run: attributes, calls, subscripts and subclassing all give placeholders."""

    def __init__(self, name: str = "placeholder") -> None:
        self._name = name

    def __getattr__(self, name: str) -> "_Placeholder":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs) -> "_Placeholder":
        return _Placeholder(f"{self._name}()")

    def __getitem__(self, item) -> "_Placeholder":
        return self

    def __mro_entries__(self, bases) -> tuple:
        return (object,)

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __iter__(self):
        return iter(())

    def __bool__(self) -> bool:
        return False


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


def sglang_package_dir() -> str | None:
    """The installed sglang package folder (found, not imported), or None."""
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def sglang_version() -> str | None:
    """The installed sglang's version (from its metadata), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def load_io_struct():
    """SGLang's ``io_struct`` module executed from the installed wheel, or None."""
    root = sglang_package_dir()
    path = os.path.join(root, "srt", "managers", "io_struct.py") if root else None
    if path is None or not os.path.isfile(path):
        return None
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] in REAL_MODULES:
            return real_import(name, globals, locals, fromlist, level)
        if level == 0 and not name.startswith("sglang"):
            try:
                return real_import(name, globals, locals, fromlist, level)
            except ImportError:
                pass
        return _PlaceholderModule(name)

    module = types.ModuleType(MODULE_NAME)
    module.__file__ = path
    sys.modules[MODULE_NAME] = module  # dataclasses looks its module up
    namespace = module.__dict__
    namespace["__builtins__"] = {**vars(builtins), "__import__": guarded_import}
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        # Statement by statement: a module-level statement that needs the real scheduler
        # types (a msgpack decoder over every IPC struct, say) is skipped; the classes
        # themselves are defined exactly as the file defines them.
        for statement in tree.body:
            code = compile(ast.Module([statement], type_ignores=[]), path, "exec")
            try:
                exec(code, namespace)  # noqa: S102 - SGLang's own file, from the wheel
            except Exception:  # noqa: BLE001 - see above
                if isinstance(statement, ast.ClassDef) and statement.name == "GenerateReqInput":
                    raise
        request = module.GenerateReqInput(input_ids=[[1], [2]], sampling_params={"n": 2},
                                          rid=["a", "b"])
        request.normalize_batch_and_arguments()
    except Exception:  # noqa: BLE001 - a release that moved things: use the written rule
        sys.modules.pop(MODULE_NAME, None)
        return None
    return module


def normalize_generate(body: dict):
    """SGLang's own normalization of a /generate body: the normalized ``GenerateReqInput``
    (``batch_size``, ``parallel_sample_num``, ``rid`` one per output), None without the
    wheel. Raises ValueError (or TypeError for an unknown field) where SGLang answers 400."""
    io_struct = load_io_struct()
    if io_struct is None:
        return None
    request = io_struct.GenerateReqInput(**body)
    request.normalize_batch_and_arguments()
    return request
