"""Checkpoints split over several files, and Hugging Face model directories.

A sharded checkpoint is an index file beside its shards:

    model.safetensors.index.json   {"metadata": {...},
                                    "weight_map": {tensor: "model-00001-of-00002.safetensors"}}
    pytorch_model.bin.index.json   the same, naming torch zip `.bin` shards

`open_sharded(index)` maps every tensor the index names to a `LazyTensor` of its shard, in the
order the unsharded file would give: safetensors in natural name order over all shards (what one
`.safetensors` gives), `.bin` shards in file-name order and each in its own (state dict) order,
which is how the sharding writers split a state dict. `model_directory(path)` picks the weights a
model directory holds (an index first, safetensors before `.bin`) and what its `config.json` says.
"""
from __future__ import annotations

import json
import os
import re

from dwjax.errors import CheckpointError
from dwjax.io.weight_files import LazyTensor, open_checkpoint

INDEX_SUFFIX = ".index.json"
# In a model directory, in order of preference: the same weights are often there twice.
DIRECTORY_CHOICES = ("model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin")
MODEL_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".onnx", ".tflite", ".keras", ".h5")


def _natural_key(name: str) -> list:
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))]


def read_index(index: str) -> dict[str, str]:
    """`{tensor: shard path}` of an index file; raises CheckpointError (one line naming the index)
    when it is unreadable, names no tensor, or names a shard that is missing or outside its
    directory."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except FileNotFoundError:
        raise CheckpointError(f"{index}: no such index file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: index without a weight_map")
    base = os.path.dirname(os.path.abspath(index))
    out = {}
    for tensor, shard in weight_map.items():
        if (not isinstance(shard, str) or os.path.isabs(shard)
                or ".." in shard.replace("\\", "/").split("/")):
            raise CheckpointError(f"{index}: shard name {shard!r} is not a file beside the index")
        path = os.path.join(base, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index}: shard {shard} is missing (named for {tensor})")
        out[tensor] = path
    return out


def shard_files(index: str) -> list[str]:
    """The index's shard paths, in natural file-name order."""
    return sorted(set(read_index(index).values()), key=lambda p: _natural_key(os.path.basename(p)))


def open_sharded(index: str) -> dict[str, LazyTensor]:
    """Every tensor an index names, as `LazyTensor`s of its shard, in the unsharded file's order.

    Raises CheckpointError for a bad index, a missing or corrupt shard, or a tensor the index
    names that its shard lacks.
    """
    weight_map = read_index(index)
    by_shard = {path: open_checkpoint(path) for path in shard_files(index)}
    out: dict[str, LazyTensor] = {}
    for path, tensors in by_shard.items():
        for name, t in tensors.items():
            if weight_map.get(name) == path:
                out[name] = t
    missing = [name for name in weight_map if name not in out]
    if missing:
        raise CheckpointError(f"{index}: shard {os.path.basename(weight_map[missing[0]])} lacks "
                              f"tensor {missing[0]} ({len(missing)} missing in all)")
    if all(p.endswith(".safetensors") for p in by_shard):
        return {name: out[name] for name in sorted(out, key=_natural_key)}
    return out


def model_directory(path: str) -> tuple[str, dict]:
    """The weights file (or index) a model directory holds, and what its `config.json` says
    (`architecture`, `model_type`, where present).

    Raises CheckpointError when the directory holds no weights file, or several with none of
    the usual names to prefer.
    """
    details = {}
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        arch = config.get("architecture") or (config.get("architectures") or [None])[0]
        details = {k: v for k, v in (("architecture", arch),
                                     ("model_type", config.get("model_type")))
                   if isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        pass
    for name in DIRECTORY_CHOICES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name), details
    entries = sorted(os.listdir(path))
    indexes = [e for e in entries if e.endswith(INDEX_SUFFIX)]
    files = indexes or [e for e in entries if e.endswith(MODEL_SUFFIXES)
                        and os.path.isfile(os.path.join(path, e))]
    if len(files) == 1:
        return os.path.join(path, files[0]), details
    if not files:
        raise CheckpointError(f"{path}: directory without a model weights file (looked for "
                              f"{', '.join(DIRECTORY_CHOICES)} and *{', *'.join(MODEL_SUFFIXES)})")
    raise CheckpointError(f"{path}: directory with several weight files ({', '.join(files)}): "
                          "name one with --checkpoint")
