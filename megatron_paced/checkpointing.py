"""Checkpoints through Megatron's ``dist_checkpointing``: policy, optimizer, PACED state, counters.

Layout::

    <save>/iter_0000040/                 one dist checkpoint (model, optimizer, log Z, replay,
                                         selector, counters) + model_config.json
    <save>/latest_checkpointed_iteration.txt

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, and
the ``latest`` file is replaced atomically after that, so a run killed at any moment leaves
the previous checkpoint complete and pointed to. Every iteration carries ``checksums.json``
(size and SHA-256 of each file, hashed by the ranks in parallel); ``--load`` checks it first
(each rank hashes its share of the files) and a corrupt, truncated or missing file, or an
unusable ``latest`` file, is an error that names it and the newest intact iteration. The
``.metadata`` pickle is read through an allow-list (``safe_unpickle.py``). The optimizer
state is saved ``dp_reshardable`` and the log-Z table and replay by row, so a run resumes on
another DP size (the model weights reshard over TP/PP too; the distributed optimizer's state
does not, on megatron-core 0.16.1). Before loading, the saved model config is compared with
this run's and any difference is reported by field.

A *model-only* checkpoint (``contents.json`` says ``["model"]``; what
``tools/convert_hf_to_megatron.py`` writes) holds just the weights: ``--load`` starts a new run
from it at step 0. Its vocabulary rows are re-padded on load, so it loads on any TP size
(Megatron pads the vocabulary to a multiple that depends on TP).

:class:`CheckpointManager` is what the trainer holds: it owns ``--save``, ``--save-interval``
and the final save, over the policy and a :class:`~megatron_paced.paced.state.PacedState`.

Usage::

    checkpoints = CheckpointManager(save_dir, save_interval, policy, PacedState(t, s, r))
    counters = checkpoints.load(load_dir)          # {} when nothing to load
    checkpoints.save_if_due(step, {"step": step, "num_samples": n})   # every interval
    checkpoints.save_final(step, {"step": step, "num_samples": n})    # unless just saved
    save_model_checkpoint(save_dir, model, model_cfg)             # weights only, step 0
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import sys

import torch
import torch.distributed as dist

from megatron_paced.config import ConfigError
from megatron_paced.models.proj_z import PREFIX as PROJ_Z_PREFIX
from megatron_paced.paced.state import PacedState, check_estimator
from megatron_paced.safe_unpickle import install_checkpoint_allow_list, load_checkpoint_pickle

LATEST = "latest_checkpointed_iteration.txt"
CONTENTS = "contents.json"
CHECKSUMS = "checksums.json"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Model config fields that do not change the saved weights' shapes.
_NOT_SHAPE = ("init_method_std", "max_position_embeddings", "make_vocab_size_divisible_by")
# Megatron 0.16.1: "fully_reshardable" breaks with torch AdamW (per-parameter "step") and
# "fully_sharded_model_space" needs flattened ShardedTensors, which it no longer supports;
# "dp_reshardable" re-partitions over any DP size (TP/PP must stay the same).
_OPTIMIZER_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> int | None:
    """The iteration ``latest`` points at (None: no ``latest`` file); a ConfigError naming the
    newest intact iteration when the file is garbled, empty or points at no folder."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        text = f.read(64).decode(errors="replace").strip()
    if not text.isdigit():
        raise ConfigError(f"--load {root!r}: {LATEST} holds {text!r}, not an iteration number"
                          f"; {_intact_hint(root)}")
    step = int(text)
    if not os.path.isdir(iteration_dir(root, step)):
        raise ConfigError(f"--load {root!r}: {LATEST} points at iteration {step}, which has no "
                          f"folder; {_intact_hint(root)}")
    return step


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files_of(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, name), path)
                  for folder, _, names in os.walk(path) for name in names if name != CHECKSUMS)


def _write_checksums(path: str) -> None:
    """``checksums.json`` of an iteration folder (collective: each rank hashes a share)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    files = _files_of(path)
    mine = {name: {"size": os.path.getsize(os.path.join(path, name)),
                   "sha256": _file_sha256(os.path.join(path, name))}
            for name in files[rank::world]}
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    if rank == 0:
        manifest = {name: entry for share in shares for name, entry in share.items()}
        with open(os.path.join(path, CHECKSUMS), "w") as f:
            json.dump(manifest, f, indent=0, sort_keys=True)


def iteration_problem(path: str, *, hash_share: tuple[int, int] | None = (0, 1)) -> str | None:
    """What is wrong with an iteration folder against its ``checksums.json`` (None: nothing,
    or an older checkpoint without one): a missing file, a size or (for this share of the
    files, ``(rank, world)``; None: sizes only) a hash that differs."""
    manifest_path = os.path.join(path, CHECKSUMS)
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        names = sorted(manifest)
        sizes = {name: int(manifest[name]["size"]) for name in names}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest_path} is unreadable"
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != sizes[name]:
            return f"{file} has {os.path.getsize(file)} bytes, {sizes[name]} were written"
    if hash_share is not None:
        rank, world = hash_share
        for name in names[rank::world]:
            if _file_sha256(os.path.join(path, name)) != manifest[name].get("sha256"):
                return f"{os.path.join(path, name)} does not match its checksum (corrupt)"
    return None


def _intact_hint(root: str, below: int | None = None) -> str:
    """Which earlier iteration to resume from, for an error message."""
    steps = sorted((int(name[5:]) for name in os.listdir(root) if name.startswith("iter_")
                    and name[5:].isdigit() and (below is None or int(name[5:]) < below)),
                   reverse=True)
    for step in steps:
        path = iteration_dir(root, step)
        if os.path.isfile(os.path.join(path, CHECKSUMS)) and \
                iteration_problem(path, hash_share=None) is None:
            return (f"the newest intact iteration is {os.path.basename(path)} (write {step} "
                    f"into {os.path.join(root, LATEST)} to resume from it)")
    return "no earlier intact iteration was found"


def verify_iteration(root: str, step: int) -> None:
    """Raise a ConfigError when iteration ``step`` of ``root`` fails its checksums (this
    process hashes its rank's share of the files; no collective)."""
    share = (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    problem = iteration_problem(iteration_dir(root, step), hash_share=share)
    if problem:
        raise ConfigError(f"--load {root!r}: {problem}; {_intact_hint(root, below=step)}")


def _sharded_state(policy, paced: PacedState, counters: dict, is_loading: bool,
                   saved_param: str | None = None) -> dict:
    ctx = policy.ctx
    model_sd = policy.modules()[0].sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                         metadata=_OPTIMIZER_META),
        "paced": paced.sharded_state_dict(replica_id=(ctx.tp_rank, ctx.pp_rank),
                                          saved_param=saved_param),
        "counters": dict(counters),
    }


def _check_finite(modules, step: int, root: str) -> None:
    finite = torch.tensor([float(all(bool(torch.isfinite(p).all())
                                     for module in modules for p in module.parameters()))])
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise FloatingPointError(f"step {step}: the policy's parameters hold NaN or inf; not "
                                 f"saving (the last checkpoint in {root} is intact)")


def _params_dtype_name(modules) -> str:
    return str(next(p for m in modules for p in m.parameters()).dtype).removeprefix("torch.")


def _write_iteration(root: str, step: int, model_cfg, sharded_state: dict,
                     contents: list[str], params_dtype: str) -> str:
    """Write one iteration folder atomically (collective): ``.tmp``, then rename, then point
    ``latest`` at it."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, step)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(sharded_state, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(dataclasses.asdict(model_cfg), f, indent=1)
        with open(os.path.join(tmp, CONTENTS), "w") as f:
            json.dump({"contents": contents, "params_dtype": params_dtype}, f)
    dist.barrier()
    _write_checksums(tmp)
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, f".{LATEST}.tmp")
        with open(latest_tmp, "w") as f:
            f.write(str(step))
        os.replace(latest_tmp, os.path.join(root, LATEST))
    dist.barrier()
    return final


def save_checkpoint(root: str, step: int, policy, paced: PacedState, counters: dict) -> str:
    """Write iteration ``step`` (collective): policy, optimizer, PACED state, counters.
    Parameters that hold NaN or inf raise FloatingPointError before anything is written."""
    _check_finite(policy.modules(), step, root)
    return _write_iteration(root, step, policy.model_cfg,
                            _sharded_state(policy, paced, counters, is_loading=False),
                            ["model", "optimizer", "paced", "counters"],
                            _params_dtype_name(policy.modules()))


def save_model_checkpoint(root: str, model, model_cfg, step: int = 0) -> str:
    """Write the weights of ``model`` (this rank's stage) as a model-only checkpoint."""
    _check_finite([model], step, root)
    return _write_iteration(root, step, model_cfg, {"model": model.sharded_state_dict()},
                            ["model"], _params_dtype_name([model]))


def _read_contents(path: str) -> dict:
    contents_path = os.path.join(path, CONTENTS)
    if not os.path.isfile(contents_path):  # older checkpoints: everything, in fp32
        return {"contents": ["model", "optimizer", "paced", "counters"]}
    with open(contents_path) as f:
        return json.load(f)


def checkpoint_contents(path: str) -> list[str]:
    """What an iteration folder holds (older checkpoints without contents.json: everything)."""
    return list(_read_contents(path)["contents"])


def _vocab_rows(full: torch.Tensor, vocab_size: int, local_rows: int, tp_rank: int):
    """Rows of a saved (padded) vocabulary tensor for this TP rank of another padding."""
    start = tp_rank * local_rows
    out = full.new_zeros(local_rows, *full.shape[1:])
    stop = min(start + local_rows, vocab_size)
    if stop > start:
        out[: stop - start] = full[start:stop]
    return out


def load_model_weights(path: str, model, model_cfg, ctx) -> None:
    """Load the model part of an iteration folder into ``model`` (this rank's stage), with
    the vocabulary rows re-padded when the checkpoint was written on another TP size."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    install_checkpoint_allow_list()
    template = model.sharded_state_dict()
    saved = dist_checkpointing.load_tensors_metadata(path)
    # A checkpoint without FlowRL's log-Z head (a base policy): the head keeps its init.
    fresh = [name for name, sharded in template.items() if name.startswith(PROJ_Z_PREFIX)
             and isinstance(sharded, ShardedTensor) and sharded.key not in saved]
    for name in fresh:
        del template[name]
    repadded = {}
    for name, sharded in template.items():
        if (isinstance(sharded, ShardedTensor) and sharded.key in VOCAB_KEYS
                and tuple(saved[sharded.key].global_shape) != tuple(sharded.global_shape)):
            meta = saved[sharded.key]
            repadded[name] = sharded.local_shape[0]
            template[name] = ShardedTensor.from_rank_offsets(
                sharded.key, torch.empty(tuple(meta.global_shape), dtype=meta.dtype),
                replica_id=sharded.replica_id)
    # A re-padded tensor is read whole by every rank, which Megatron's access check (one
    # main replica per shard) would refuse; it is skipped only then.
    loaded = dist_checkpointing.load({"model": template}, path,
                                     validate_access_integrity=not repadded)["model"]
    for name, local_rows in repadded.items():
        loaded[name] = _vocab_rows(loaded[name], model_cfg.vocab_size, local_rows, ctx.tp_rank)
    current = model.state_dict()
    loaded.update({name: current[name] for name in fresh})
    model.load_state_dict(loaded)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):  # e.g. an epsilon read from float32
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def no_checkpoint_message(root: str) -> str:
    """What a --load folder without a ``latest`` file holds, and what to pass instead."""
    names = sorted(os.listdir(root))
    if "config.json" in names and any(name in names for name in HF_WEIGHTS):
        return (f"--load {root!r} is a Hugging Face model folder, not a Megatron checkpoint: "
                f"convert it first (python tools/convert_hf_to_megatron.py --hf-dir {root} "
                f"--save CKPT) and pass --load CKPT")
    found = "it is empty" if not names else \
        f"it holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
    return (f"--load {root!r} holds no checkpoint (no {LATEST}; {found}): pass a folder "
            f"written by tools/convert_hf_to_megatron.py or by a run's --save, or leave out "
            f"--load (or pass the same folder as --save to resume a requeued job)")


def check_metadata(root: str, path: str) -> None:
    """Read the iteration's torch ``.metadata`` through the allow-list (no collective): a
    crafted or damaged one is a ConfigError naming it, before any model is built."""
    metadata = os.path.join(path, ".metadata")
    if not os.path.isfile(metadata):
        return  # listed in checksums.json when it should be there: verify_iteration's case
    try:
        with open(metadata, "rb") as f:
            load_checkpoint_pickle(f, metadata)
    except OSError as err:
        raise ConfigError(f"--load {root!r}: {metadata}: {err.strerror}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"--load {root!r}: {err}" if metadata in str(err) else
                          f"--load {root!r}: {metadata} is unreadable ({err})") from None


def check_loadable(root: str, model_cfg, params_dtype: torch.dtype | None = None, *,
                   may_be_empty: bool = False) -> int | None:
    """The step to resume from, or None (only with ``may_be_empty``: ``--load`` is also
    ``--save``, Megatron's pattern for a job that is requeued, and nothing is saved yet);
    raises ConfigError (no collective) when ``--load`` does not exist, holds no checkpoint
    (an HF folder named as such), holds another model's shape, or (given ``params_dtype``)
    holds optimizer state of another precision (weights alone load in any precision)."""
    install_checkpoint_allow_list()
    if not os.path.isdir(root):
        if may_be_empty:
            return None
        raise ConfigError(f"--load {root!r}: no such folder")
    step = latest_step(root)
    if step is None:
        if may_be_empty:
            return None
        raise ConfigError(no_checkpoint_message(root))
    path = iteration_dir(root, step)
    config_path = os.path.join(path, "model_config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"--load {root!r}: {path} is not a megatron-paced checkpoint")
    verify_iteration(root, step)
    try:
        with open(config_path) as f:
            saved = json.load(f)
    except ValueError:
        raise ConfigError(f"--load {root!r}: {config_path} is not valid JSON; "
                          f"{_intact_hint(root, below=step)}") from None
    ours = dataclasses.asdict(model_cfg)
    different = {k: (saved.get(k), v) for k, v in ours.items()
                 if k not in _NOT_SHAPE and not _same(saved.get(k), v)}
    if different:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}"
                            for k, (a, b) in different.items())
        raise ConfigError(f"--load {root!r} holds another model shape ({listing})")
    if params_dtype is not None:
        saved = _read_contents(path)
        saved_dtype = saved.get("params_dtype", "float32")
        ours = str(params_dtype).removeprefix("torch.")
        if "optimizer" in saved["contents"] and saved_dtype != ours:
            raise ConfigError(
                f"--load {root!r}: {path} was trained in {saved_dtype} and this run is {ours} "
                f"({'--bf16' if ours == 'bfloat16' else '--no-bf16'}); its optimizer state does "
                "not carry over: resume with the precision it was saved with")
    check_metadata(root, path)
    return step


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no state to describe in a load template; give it
    Megatron's own dummy state (a zero-gradient step), which the load then overwrites --
    weights included, since the model is loaded after."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not inner.optimizer.state and hasattr(inner, "_init_optimizer_states_with_dummy_values"):
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Megatron 0.16.1 puts the loaded Adam step count in ``param_groups[i]["step"]``, but
    torch's AdamW reads the per-parameter ``state["step"]`` (left at the dummy 1): copy it over
    so that bias correction continues exactly (see patches/README.md)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.optimizer.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    # A tensor of its own: after the load all parameters share one.
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def load_checkpoint(root: str, policy, paced: PacedState, step: int) -> dict:
    """Load iteration ``step`` of ``root`` (as :func:`check_loadable` found and verified it)
    into policy, optimizer and PACED state; returns counters. Selection settings that differ
    from the checkpoint's are reported (rank 0, stderr)."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, step)
    if checkpoint_contents(path) == ["model"]:
        load_model_weights(path, policy.modules()[0], policy.model_cfg, policy.ctx)
        return {"model_only": True}
    _materialize_optimizer_state(policy.optimizer)
    common = dist_checkpointing.load_common_state_dict(path)
    saved_param = common["paced"]["log_z_meta"]["param"]
    check_estimator(common["paced"]["log_z_meta"], paced.log_z, paced.estimator)
    template = _sharded_state(policy, paced, {}, is_loading=True, saved_param=saved_param)
    loaded = dist_checkpointing.load(template, iteration_dir(root, step))
    policy.modules()[0].load_state_dict(loaded["model"])
    with torch.no_grad():  # Megatron copies into parameter views in place
        policy.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(policy.optimizer)
    changed = paced.load_state_dict(loaded["paced"])
    if changed and dist.get_rank() == 0:
        print(f"paced-train: warning: --load {root}: this run selects prompts with other "
              f"settings than the checkpoint's: {'; '.join(changed)}", file=sys.stderr,
              flush=True)
    return dict(loaded["counters"])


class CheckpointManager:
    """A run's checkpoints: the policy (weights and optimizer), the PACED state and the
    counters, written to ``save_dir`` every ``save_interval`` steps and at the end of the run
    (nothing without ``save_dir``), read back by :meth:`load`."""

    def __init__(self, save_dir: str | None, save_interval: int, policy,
                 paced: PacedState) -> None:
        self.save_dir, self.save_interval = save_dir, save_interval
        self.policy, self.paced = policy, paced

    def load(self, root: str, step: int | None = None) -> dict:
        """Iteration ``step`` of ``root`` (default: the latest, checked and verified here)
        into the policy and PACED state; its counters ({} where ``root`` holds none)."""
        step = (check_loadable(root, self.policy.model_cfg, may_be_empty=True) if step is None
                else step)
        return {} if step is None else load_checkpoint(root, self.policy, self.paced, step)

    def save(self, step: int, counters) -> str:
        """``counters``: a dict, or a function that makes it (called only to save)."""
        if callable(counters):
            counters = counters()
        return save_checkpoint(self.save_dir, step, self.policy, self.paced, counters)

    def save_if_due(self, step: int, counters) -> bool:
        """Save at every ``save_interval``-th step; True if it saved."""
        due = bool(self.save_dir and self.save_interval and step % self.save_interval == 0)
        if due:
            self.save(step, counters)
        return due

    def save_final(self, step: int, counters) -> None:
        """The end of the run: save, unless the interval just did."""
        if self.save_dir and (not self.save_interval or step % self.save_interval):
            self.save(step, counters)
