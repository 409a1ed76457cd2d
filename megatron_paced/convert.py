"""Checkpoint conversion: Hugging Face safetensors <-> Megatron ``dist_checkpointing``, streamed
one layer at a time.

HF -> Megatron (:func:`convert_hf_to_megatron`, collective over a TP x PP world, DP 1): every
rank builds its stage of the ``GPTModel`` without initializing it, then for each layer reads
just that layer's HF tensors (``safe_open``, no whole-file load), maps them with the
declarative table of :mod:`megatron_paced.models.hf_mapping` (the one the weight sync uses),
copies its TP shard in and drops the full tensors; the result is written as a model-only
checkpoint (:func:`megatron_paced.checkpointing.save_model_checkpoint`) that ``paced-train
--load`` reads on any later TP/PP layout. The HF ``config.json`` and tokenizer files are kept
in ``<save>/hf/`` for the way back.

Megatron -> HF (:func:`convert_megatron_to_hf`, one process): reads the checkpoint's tensor
metadata, then loads one layer at a time (a ShardedTensor for layer i of the stacked layer
axis), maps it to HF names and appends it to size-bounded safetensors shards; writes
``model.safetensors.index.json``, ``config.json`` and the tokenizer files.

Neither side holds more than one layer of the full model (plus the embedding) at a time.
Everything about the input is checked before anything is written: the architecture, every
shard file of the index, every tensor's presence, shape and dtype, and that the TP size
divides the heads. Output goes to ``<save>.incomplete`` and is renamed to ``<save>`` at the
end, so an interrupted conversion never leaves a folder that looks complete.

Usage::

    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B \\
        --save ckpt/qwen7b --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python tools/convert_megatron_to_hf.py --load ckpt/qwen7b --save hf/qwen7b
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from megatron_paced.checkpointing import (
    check_metadata,
    iteration_dir,
    latest_step,
    save_model_checkpoint,
    verify_iteration,
)
from megatron_paced.config import ConfigError, ParallelConfig
from megatron_paced.models.config import ModelConfig
from megatron_paced.models.gpt import build_gpt_model
from megatron_paced.models.hf_mapping import (
    HF_GLOBAL_TO_MEGATRON,
    hf_layer_of,
    hf_param_shapes,
    hf_to_megatron,
    megatron_to_hf,
)
from megatron_paced.models.sharding import global_param_names, load_full_params_
from megatron_paced.parallel import destroy_parallel, initialize_parallel
from megatron_paced.safe_unpickle import install_checkpoint_allow_list

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _progress(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


@dataclass
class HFCheckpoint:
    """A validated Hugging Face checkpoint folder; tensors are read on demand."""

    folder: str
    config: dict
    model_cfg: ModelConfig
    weight_map: dict[str, str]
    """HF tensor name -> shard file name."""
    dtype: torch.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Just these tensors, opened shard by shard."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(os.path.join(self.folder, file), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out


def _read_json(folder: str, name: str):
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except OSError as err:
        raise ConfigError(f"--hf-dir {folder!r}: {name}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--hf-dir {folder!r}: {name} is not valid JSON ({err})") from None


def _safetensors_keys(folder: str, file: str) -> list[str]:
    """The tensor names of one shard; a truncated or damaged file is a ConfigError naming it
    (safetensors checks the header against the file's size)."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, file)
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        size = os.path.getsize(path)
        with open(path, "rb") as raw:
            header = int.from_bytes(raw.read(8), "little")
            end = max((entry["data_offsets"][1] for key, entry in
                       json.loads(raw.read(header)).items() if key != "__metadata__"),
                      default=0)
        if 8 + header + end > size:
            raise ValueError(f"{size} bytes, the header needs {8 + header + end}")
        return keys
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--hf-dir {folder!r}: {file} is not a complete safetensors file "
                          f"({err})") from None


def open_hf_checkpoint(folder: str, parallel: ParallelConfig | None = None) -> HFCheckpoint:
    """Read and check ``folder``'s config, index, shards and tensor headers (no weights)."""
    from safetensors import safe_open

    if not os.path.isdir(folder):
        raise ConfigError(f"--hf-dir {folder!r}: no such folder")
    config = _read_json(folder, "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"--hf-dir {folder!r}: config.json is not a JSON object")
    try:
        model_cfg = ModelConfig.from_hf_config(folder)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"--hf-dir {folder!r}: config.json cannot describe a model "
                          f"({type(err).__name__}: {err})") from None
    if parallel is not None:
        model_cfg.validate(parallel)
    index_path = os.path.join(folder, INDEX)
    if os.path.isfile(index_path):
        index = _read_json(folder, INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ConfigError(f"--hf-dir {folder!r}: {INDEX} has no weight_map of file names")
        weight_map = dict(weight_map)
    elif os.path.isfile(os.path.join(folder, SINGLE)):
        weight_map = {name: SINGLE for name in _safetensors_keys(folder, SINGLE)}
    else:
        raise ConfigError(f"--hf-dir {folder!r}: no {INDEX} or {SINGLE} (only safetensors "
                          "checkpoints are read)")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    root = os.path.realpath(folder)
    for file, names in sorted(files.items()):
        if os.path.dirname(os.path.realpath(os.path.join(root, file))) != root:
            raise ConfigError(f"--hf-dir {folder!r}: {INDEX} points at {file!r}, outside the "
                              "folder: only files inside --hf-dir are read")
        if not os.path.isfile(os.path.join(folder, file)):
            raise ConfigError(f"--hf-dir {folder!r}: missing shard {file} (listed in {INDEX} "
                              f"for {len(names)} tensors, e.g. {names[0]})")
    expected = hf_param_shapes(model_cfg)
    weight_map = {n: f for n, f in weight_map.items() if not n.endswith(_IGNORED_SUFFIXES)}
    if not model_cfg.untie_embeddings_and_output_weights:
        weight_map.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    missing = [n for n in expected if n not in weight_map]
    unexpected = sorted(set(weight_map) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"--hf-dir {folder!r}: does not match its config.json "
                          f"({model_cfg.architecture}, {model_cfg.num_layers} layers): missing "
                          f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                          f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    dtypes: dict[torch.dtype, str] = {}
    for file, names in sorted(files.items()):
        _safetensors_keys(folder, file)  # a truncated or foreign file fails here, by name
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            for name in names:
                if name not in expected:
                    continue
                tensor = f.get_slice(name)
                shape, dtype_name = tuple(tensor.get_shape()), tensor.get_dtype()
                if shape != expected[name]:
                    raise ConfigError(f"--hf-dir {folder!r}: {name} in {file} has shape {shape}; "
                                      f"config.json implies {expected[name]}")
                if dtype_name not in _DTYPES:
                    raise ConfigError(f"--hf-dir {folder!r}: {name} in {file} is {dtype_name}; "
                                      "only float32, bfloat16 and float16 are converted")
                dtypes.setdefault(_DTYPES[dtype_name], f"{name} in {file}")
    if len(dtypes) > 1:
        listing = "; ".join(f"{_DTYPE_NAMES[d]} ({where})" for d, where in dtypes.items())
        raise ConfigError(f"--hf-dir {folder!r}: dtype mismatch between tensors: {listing}")
    dtype = next(iter(dtypes))
    declared = config.get("torch_dtype", config.get("dtype"))
    if declared not in (None, "auto") and declared != _DTYPE_NAMES[dtype]:
        raise ConfigError(f"--hf-dir {folder!r}: dtype mismatch: config.json says {declared} but "
                          f"the tensors are {_DTYPE_NAMES[dtype]} (e.g. {dtypes[dtype]})")
    return HFCheckpoint(folder, config, model_cfg, weight_map, dtype)


def _check_output(save: str) -> str:
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise ConfigError(f"--save {save!r} already exists and is not empty (refusing to "
                          "overwrite)")
    return save.rstrip("/") + ".incomplete"


def _finish_output(staging: str, save: str) -> None:
    if os.path.isdir(save):
        os.rmdir(save)  # empty (checked before any work)
    os.replace(staging, save)


def _copy_assets(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def convert_hf_to_megatron(hf_dir: str, save: str, parallel: ParallelConfig, *,
                           progress: bool = True) -> ModelConfig:
    """HF folder -> model-only Megatron checkpoint (collective over ``torchrun``'s world: TP x
    PP ranks; more ranks are data-parallel replicas that do the same). Returns the config."""
    import torch.distributed as dist

    source = open_hf_checkpoint(hf_dir, parallel)
    parallel.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    staging = _check_output(save)
    cfg = source.model_cfg
    ctx = initialize_parallel(parallel, seed=0)
    try:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            _copy_assets(hf_dir, os.path.join(staging, "hf"))
        model = build_gpt_model(cfg, ctx, seed=0, params_dtype=source.dtype, initialize=False)
        names = set(global_param_names(model).values())
        te_names = any("layer_norm_weight" in n for n in names)
        layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")})
        by_layer: dict[int | None, list[str]] = {}
        for hf_name in hf_param_shapes(cfg):
            by_layer.setdefault(hf_layer_of(hf_name), []).append(hf_name)
        wanted_globals = [n for n in by_layer[None] if HF_GLOBAL_TO_MEGATRON[n] in names]
        loaded: set[str] = set()
        started = time.perf_counter()
        for position, layer in enumerate([None, *layers]):
            hf_names = wanted_globals if layer is None else by_layer[layer]
            full = hf_to_megatron(source.read(hf_names), cfg,
                                  padded_vocab_size=cfg.padded_vocab_size(ctx.tp_size),
                                  te_layernorm_names=te_names, complete=False)
            loaded.update(load_full_params_(model, full, tp_rank=ctx.tp_rank,
                                            tp_size=ctx.tp_size, strict=False))
            del full
            if layer is not None:
                _progress(f"[stage {ctx.pp_rank} tp {ctx.tp_rank}] layer {layer} "
                          f"({position}/{len(layers)}, {time.perf_counter() - started:.1f} s)",
                          progress and ctx.tp_rank == 0)
        not_loaded = sorted(names - loaded)
        if not_loaded:
            raise ConfigError(f"--hf-dir {hf_dir!r}: no HF tensor for {not_loaded[:4]}")
        save_model_checkpoint(staging, model, cfg)
        dist.barrier()
        if dist.get_rank() == 0:
            _finish_output(staging, save)
        dist.barrier()
    finally:
        destroy_parallel()
    return cfg


def _read_slices(path: str, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
    """Fill each ``tensor`` with the block of checkpoint tensor ``key`` that starts at
    ``offsets`` (a layer of a stacked parameter), reading only the chunks that overlap it.

    Megatron's ``torch_dist`` checkpoints are PyTorch distributed checkpoints (DCP); a load
    planner that asks for one block is what reads a slice, in a single process (Megatron's
    own load builds a world-sized shard grid, which a 1-process world cannot describe)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, tensor) in requests.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
                items += create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return requests[index.fqn][1]

    with warnings.catch_warnings():  # "torch.distributed is disabled ...": on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: tensor for key, (_, tensor) in requests.items()},
                 storage_reader=dcp.FileSystemReader(path), planner=SlicePlanner(),
                 no_dist=True)


def _load_layer(path: str, metadata: dict, keys: list[str], layer: int | None
                ) -> dict[str, torch.Tensor]:
    """Full tensors of one layer (or the non-layer tensors), by global Megatron name."""
    requests = {}
    for key in keys:
        shape, dtype = tuple(metadata[key].global_shape), metadata[key].dtype
        if layer is None:
            requests[key] = ((0,) * len(shape), torch.empty(shape, dtype=dtype))
        else:
            requests[key] = ((layer,) + (0,) * (len(shape) - 1),
                             torch.empty((1, *shape[1:]), dtype=dtype))
    _read_slices(path, requests)
    if layer is None:
        return {key: tensor for key, (_, tensor) in requests.items()}
    return {f"decoder.layers.{layer}." + key[len("decoder.layers."):]: tensor[0]
            for key, (_, tensor) in requests.items()}


class _ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each, written as tensors arrive."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, int] = {}
        self.num_files = 0
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self.flush()
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        self.num_files += 1
        save_file(self.pending, os.path.join(self.folder, f"part-{self.num_files:05d}"),
                  metadata={"format": "pt"})
        for name in self.pending:
            self.weight_map[name] = self.num_files
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards ``model-0000i-of-0000n.safetensors`` and write the index."""
        self.flush()
        n = self.num_files
        names = {i: (SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
                 for i in range(1, n + 1)}
        for i, name in names.items():
            os.replace(os.path.join(self.folder, f"part-{i:05d}"),
                       os.path.join(self.folder, name))
        if n > 1:
            with open(os.path.join(self.folder, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes},
                           "weight_map": {k: names[v] for k, v in self.weight_map.items()}},
                          f, indent=2)


def export_sources(load: str, tokenizer: str | None) -> tuple[str | None, str | None]:
    """(model assets, tokenizer) folders an export copies from: ``<load>/hf`` (kept by
    convert_hf_to_megatron); for a training run's folder, the ``hf`` folder of the run's own
    ``--load`` and its ``--tokenizer``, read from the run's ``config.yaml``; ``tokenizer``
    (the converter's flag) first. None where there is none."""
    assets = os.path.join(load, "hf")
    run_config = os.path.join(load, "config.yaml")
    if not os.path.isdir(assets) and os.path.isfile(run_config):
        import yaml

        with open(run_config) as f:
            run = yaml.safe_load(f) or {}
        started = os.path.join(run["load"], "hf") if run.get("load") else None
        assets = started if started and os.path.isdir(started) else None
        if tokenizer is None and run.get("tokenizer") and os.path.isdir(run["tokenizer"]):
            tokenizer = run["tokenizer"]
    return (assets if assets and os.path.isdir(assets) else None), tokenizer


def special_token_ids(folder: str) -> dict[str, int]:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of the HF tokenizer in ``folder``
    (those it defines; {} without a tokenizer there)."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES[:2]):
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return {key: value for key, value in ids.items() if value is not None}


def convert_megatron_to_hf(load: str, save: str, *, tokenizer: str | None = None,
                           max_shard_gb: float = 5.0, progress: bool = True) -> ModelConfig:
    """Megatron checkpoint folder (the latest iteration) -> HF folder. One process, no
    process group."""

    install_checkpoint_allow_list()

    if not os.path.isdir(load):
        raise ConfigError(f"--load {load!r}: no such folder")
    step = latest_step(load)
    if step is None:
        raise ConfigError(f"--load {load!r}: no latest_checkpointed_iteration.txt (not a "
                          "megatron-paced checkpoint, or an unfinished one)")
    path = iteration_dir(load, step)
    verify_iteration(load, step)
    with open(os.path.join(path, "model_config.json")) as f:
        cfg = ModelConfig(**json.load(f))
    check_metadata(load, path)
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise ConfigError(f"--tokenizer {tokenizer!r}: no such folder")
    staging = _check_output(save)
    from megatron.core import dist_checkpointing

    metadata = {k: v for k, v in dist_checkpointing.load_tensors_metadata(path).items()
                if not k.startswith(("optimizer", "paced", "proj_z"))}  # FlowRL's head: not HF
    layer_keys = [k for k in metadata if k.startswith("decoder.layers.")]
    global_keys = [k for k in metadata if not k.startswith("decoder.layers.")]
    dtype = metadata["embedding.word_embeddings.weight"].dtype  # the model's weights' dtype
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    writer = _ShardWriter(staging, int(max_shard_gb * 2**30))
    started = time.perf_counter()
    def to_hf(layer: int | None) -> dict[str, torch.Tensor]:  # norms may be kept in fp32
        keys = global_keys if layer is None else layer_keys
        return {k: v.to(dtype) for k, v in
                megatron_to_hf(_load_layer(path, metadata, keys, layer), cfg).items()}

    embeddings = to_hf(None)
    writer.add({"model.embed_tokens.weight": embeddings.pop("model.embed_tokens.weight")})
    for layer in range(cfg.num_layers):
        writer.add(to_hf(layer))
        _progress(f"layer {layer + 1}/{cfg.num_layers} ({time.perf_counter() - started:.1f} s)",
                  progress)
    writer.add(embeddings)  # final norm (and lm_head when untied)
    writer.close()
    assets, tokenizer = export_sources(load, tokenizer)
    for source in (assets, tokenizer):  # the tokenizer's files win over the model's
        if source is not None:
            _copy_assets(source, staging)
    config = cfg.to_hf_config(_DTYPE_NAMES[dtype])
    if assets is not None and os.path.isfile(os.path.join(assets, "config.json")):
        with open(os.path.join(assets, "config.json")) as f:  # the converted model's own
            config = json.load(f)
        config.pop("dtype", None)
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
    if tokenizer is not None or assets is not None:
        for key, value in special_token_ids(tokenizer or assets).items():
            config.setdefault(key, value)  # what generate() stops at and pads with
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _finish_output(staging, save)
    return cfg
