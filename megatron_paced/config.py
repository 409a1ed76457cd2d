"""Typed configuration: small dataclasses per component, turned into Megatron-style flags.

Each component owns a dataclass whose fields carry a docstring right below them (as in
Megatron's ``TransformerConfig`` and torchtitan's job config). :func:`add_flags` turns a
dataclass into argparse flags named like Megatron's (``tensor_model_parallel_size`` ->
``--tensor-model-parallel-size``), with the field docstring as the help text, and
:func:`from_args` builds the dataclass back from the parsed namespace. A config's
``validate()`` raises :class:`ConfigError` (a ``ValueError``) naming the flag and the value,
so that bad input fails at start-up, before any process group or model exists.

Usage::

    parser = argparse.ArgumentParser()
    add_flags(parser, ParallelConfig)
    args = parser.parse_args(["--tensor-model-parallel-size", "2"])
    parallel = from_args(ParallelConfig, args)
    parallel.validate(world_size=4)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag and the value."""


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``prog: error: ...``, without the
    usage block (``--help`` prints it on request); exit code 2, as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def description(doc: str) -> str:
    """A module docstring's first paragraph as one line: a ``--help`` description."""
    return " ".join(doc.split("\n\n")[0].split())


def flag(name: str) -> str:
    """The command-line flag of a config field: ``micro_batch_size`` -> ``--micro-batch-size``."""
    return "--" + name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` to ``parser`` (in a group named ``title``)."""
    group = parser.add_argument_group(title or cls.__name__)
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        # argparse fills %(default)s when it prints: the default the run uses, also after
        # parser.set_defaults (a preset's shape, a YAML file).
        help_text = docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Union:  # Optional[X]
            non_none = [a for a in args if a is not type(None)]
            tp = non_none[0]
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
            kwargs["type"] = type(args[0])
        elif origin in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = args[0]
        else:
            kwargs["type"] = tp
        group.add_argument(flag(f.name), **kwargs)


def from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build dataclass ``cls`` from the flags that :func:`add_flags` added."""
    values = {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and hasattr(namespace, f.name)
    }
    return cls(**values)


def require(condition: bool, field_name: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` naming ``--field-name`` and its value unless ``condition``."""
    if not condition:
        raise ConfigError(f"{flag(field_name)} {value!r}: {why}")


@dataclass
class ParallelConfig:
    """How the model is split over ranks: TP x PP inside a model replica, DP across replicas."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer's weights (Megatron tensor parallelism)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the stack of layers into consecutive stages (pipeline parallelism)."""
    sequence_parallel: bool = False
    """Split activations along the sequence in the TP region (needs TP > 1 and TE norms)."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto (and nccl) use NCCL for CUDA tensors and gloo for the
    host-side ones with CUDA, gloo without."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in backward (Megatron's): selective recomputes core attention,
    full every layer (uniform, one layer per unit); the numbers stay the same, the memory drops
    (tools/plan_parallelism.py --recompute estimates how much)."""

    def validate(self, world_size: int | None = None) -> None:
        require(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size",
                self.tensor_model_parallel_size, "must be >= 1")
        require(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size",
                self.pipeline_model_parallel_size, "must be >= 1")
        if self.sequence_parallel:
            require(self.tensor_model_parallel_size > 1, "sequence_parallel", True,
                    "needs --tensor-model-parallel-size > 1")
        if world_size is not None:
            model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
            if world_size % model_parallel != 0:
                raise ConfigError(
                    f"world size {world_size} is not divisible by "
                    f"--tensor-model-parallel-size {self.tensor_model_parallel_size} x "
                    f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size} "
                    f"= {model_parallel}"
                )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass
class OptimizerConfig:
    """The policy's optimizer (Megatron's distributed optimizer over the DP group)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer of the policy's weights (adam means AdamW with decoupled weight decay)."""
    lr: float = 1e-6
    """Learning rate of the policy."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    sgd_momentum: float = 0.0
    """Momentum of SGD."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all TP/PP/DP shards) to this value; 0 disables."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state and the fp32 main weights over the data-parallel group."""

    def validate(self) -> None:
        require(self.lr >= 0, "lr", self.lr, "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(self.adam_eps > 0, "adam_eps", self.adam_eps, "must be > 0")
        require(self.clip_grad >= 0, "clip_grad", self.clip_grad, "must be >= 0 (0 disables)")
        if self.optimizer != "adam" and self.use_distributed_optimizer:
            raise ConfigError(
                f"--optimizer {self.optimizer!r} with --use-distributed-optimizer: Megatron's "
                "distributed optimizer supports only adam; pass --no-use-distributed-optimizer"
            )
