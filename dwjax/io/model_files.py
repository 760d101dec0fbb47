"""The one place that tells a model file's format by its content and opens it.

`open_model(path)` accepts what `convert --checkpoint` may name: a file, a sharded checkpoint's
index, or a model directory. The format comes from the bytes, not the name (the extension only
breaks ties where the bytes cannot: `.safetensors` and `.onnx`, which have no magic number):

| format | recognised by | read by |
| --- | --- | --- |
| `safetensors` | 8-byte header length, then `{` | `weight_files` |
| `torch-zip` | zip with `data.pkl` | `weight_files` |
| `torch-legacy` | a pickle (`0x80`) | `weight_files` |
| `safetensors-sharded`, `torch-sharded` | `*.index.json` | `checkpoint_shards` |
| `onnx` | protobuf ModelProto (`0x08`, ir_version) or `.onnx` | `onnx_graph` |
| `tflite` | flatbuffer identifier `TFL3` | `tflite_model` |
| `keras` | zip with `config.json` or `model.weights.h5`, no `data.pkl` | `keras_file` |
| `keras-h5` | HDF5 signature | `keras_file` |

State-dict formats yield their depthwise layers lazily by shape (`extract.layers_from_state`);
graph formats (ONNX, TFLite, Keras) are read when opened, so a bad tensor fails before anything
is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import zipfile
from typing import Callable

from dwjax.errors import CheckpointError
from dwjax.io import (checkpoint_shards, keras_file, onnx_graph, shards, tflite_model,
                      weight_files)
from dwjax.io.extract import DepthwiseLayer, GraphWeights, layers_from_state, regular_sample

GRAPH_READERS = {"onnx": onnx_graph.read_onnx, "tflite": tflite_model.read_tflite,
                 "keras": keras_file.read_keras, "keras-h5": keras_file.read_keras}


@dataclasses.dataclass
class ModelFile:
    """An opened model file: its format, every file it spans (the first is the one read, an
    index or the file itself; shards and external data follow), what the file says about its
    weights (`details`: batch_norm, stored element types, a directory's architecture), and
    loaders of its depthwise layers and of a sample of its regular-convolution kernels."""
    path: str
    format: str
    files: list[str]
    details: dict
    layers: Callable[[], list[DepthwiseLayer]]
    regular: Callable[[int], dict]

    def sha256(self) -> str:
        """The file's sha256; for several files, the sha256 of their `name sha256` lines."""
        if len(self.files) == 1:
            return shards.sha256_file(self.files[0])
        lines = sorted(f"{os.path.relpath(p, os.path.dirname(self.files[0]))} "
                       f"{shards.sha256_file(p)}\n" for p in self.files)
        return hashlib.sha256("".join(lines).encode()).hexdigest()


def detect_format(path: str) -> str:
    """The format name of a file (see the module table); raises CheckpointError for a file of no
    known format, naming it."""
    if path.endswith(checkpoint_shards.INDEX_SUFFIX):
        shards = checkpoint_shards.shard_files(path)
        return ("safetensors-sharded" if all(p.endswith(".safetensors") for p in shards)
                else "torch-sharded")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    if len(head) < 8:
        raise CheckpointError(f"{path}: empty or truncated checkpoint file")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) and (
                "config.json" in names or "model.weights.h5" in names):
            return "keras"
        return "torch-zip"  # weight_files names any other zip as not a torch checkpoint
    if head[:8] == keras_file.HDF5_MAGIC:
        return "keras-h5"
    if head[4:8] == b"TFL3":
        return "tflite"
    (header_len,) = struct.unpack("<Q", head[:8])
    if path.endswith(".safetensors") or (header_len < size - 8 and head[8:9] == b"{"):
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if path.endswith(".onnx") or head[:1] == b"\x08":
        return "onnx"
    raise CheckpointError(f"{path}: unknown checkpoint format (not safetensors, torch zip or "
                          "legacy, ONNX, TFLite or Keras)")


def open_model(path: str) -> ModelFile:
    """Opens a model file, a sharded checkpoint's index or a model directory.

    Raises CheckpointError (one line naming the file) for anything unreadable, truncated,
    corrupt or of unknown format, and for a graph file without depthwise layers.
    """
    details: dict = {}
    target = path
    if os.path.isdir(path):
        target, details = checkpoint_shards.model_directory(path)
        details = {"directory_file": os.path.basename(target), **details}
    fmt = detect_format(target)
    if fmt in GRAPH_READERS:
        graph: GraphWeights = GRAPH_READERS[fmt](target)
        files = [target] + graph.files
        return ModelFile(path, fmt, files, {**details, **graph.details},
                         lambda: graph.layers, lambda n: regular_sample(graph.regular, n))
    if fmt.endswith("-sharded"):
        tensors = checkpoint_shards.open_sharded(target)
        files = [target] + checkpoint_shards.shard_files(target)
    else:
        tensors = weight_files.open_checkpoint(target)
        files = [target]
    return ModelFile(path, fmt, files, details, lambda: layers_from_state(tensors),
                     lambda n: regular_sample(tensors, n))

