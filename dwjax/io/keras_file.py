"""Depthwise kernels of a Keras model file, read with h5py (no TensorFlow, no Keras).

Two layouts, both described by the model's config (JSON):

    model.keras (zip)     config.json, model.weights.h5: `layers/<path>/vars/<i>`, each `vars`
                          group naming its layer in `attrs["name"]` (nested models:
                          `layers/<model>/layers/<layer>/vars/<i>`)
    model.h5 (legacy)     attrs["model_config"], group `model_weights/<top layer>` with
                          attrs["weight_names"] `["<layer>/<var>", …]` (Keras 2 adds `:0`)

Depthwise layers: `DepthwiseConv2D` (kernel `[H, W, C, M]`), `SeparableConv2D` (its depthwise
kernel, `[H, W, C, M]`) and `Conv2D` with `groups` equal to its input channels (`[H, W, 1, C·M]`).
Keras convolves by cross-correlation over NHWC and the depthwise output channel of input c and
multiplier m is c·M + m, so kernel c·M + m is `kernel[:, :, c, m]` (row = y, column = x): what
PyTorch's `[C·M, 1, H, W]` holds. Layers come in the config's (network) order, named by layer
name (nested ones `outer/inner`). Batch norm is never folded in a Keras file: `batch_norm` says
whether a BatchNormalization layer consumes each depthwise layer's output.
"""
from __future__ import annotations

import io
import json
import zipfile
from typing import Any, Iterator

import numpy as np

from dwjax.errors import CheckpointError
from dwjax.io.extract import DepthwiseLayer, GraphWeights, TensorRef, batch_norm_state

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CONTAINERS = ("Functional", "Sequential", "Model")
_DEPTHWISE = ("DepthwiseConv2D", "SeparableConv2D")
# the variable of each class that holds its spatial kernel (Keras 3 order, Keras 2 name)
_KERNEL_VAR = {"DepthwiseConv2D": (0, "depthwise_kernel"),
               "SeparableConv2D": (0, "depthwise_kernel"), "Conv2D": (0, "kernel")}


def _import_h5py(path: str):
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            f"{path}: reading Keras files needs h5py: pip install 'dwjax[formats]'"
        ) from None
    return h5py


def _layers(config: Any, prefix: str = "") -> Iterator[tuple[str, dict, list[str]]]:
    """`(path, layer dict, path of its parents)` for every layer, depth first in config order."""
    cfg = config.get("config", config) if isinstance(config, dict) else config
    items = cfg.get("layers", []) if isinstance(cfg, dict) else cfg
    for layer in items if isinstance(items, list) else []:
        if not isinstance(layer, dict):
            continue
        name = layer.get("config", {}).get("name") or layer.get("name", "")
        path = f"{prefix}{name}"
        yield path, layer, prefix.rstrip("/").split("/") if prefix else []
        if layer.get("class_name") in _CONTAINERS or "layers" in layer.get("config", {}):
            yield from _layers(layer, f"{path}/")


def _inbound(layer: dict) -> set[str]:
    """Names of the layers whose outputs this layer takes (Keras 3 `keras_history`, or Keras 2
    `[name, node, tensor, kwargs]` lists)."""
    found: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            history = x.get("keras_history")
            if isinstance(history, list) and history and isinstance(history[0], str):
                found.add(history[0])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            if len(x) >= 3 and isinstance(x[0], str) and isinstance(x[1], int):
                found.add(x[0])
            for v in x:
                walk(v)

    walk(layer.get("inbound_nodes", []))
    return found


def _depthwise_kind(layer: dict, kernel_shape: tuple[int, ...] | None) -> bool:
    cls = layer.get("class_name")
    if cls in _DEPTHWISE:
        return True
    groups = layer.get("config", {}).get("groups", 1)
    return (cls == "Conv2D" and isinstance(groups, int) and groups > 1
            and kernel_shape is not None and len(kernel_shape) == 4 and kernel_shape[2] == 1)


class _Weights:
    """`(layer path, variable) → h5py dataset` for one of the two layouts."""

    def __init__(self, path: str, root: Any, legacy: bool):
        self.path, self.root, self.legacy = path, root, legacy
        self.by_layer: dict[str, dict[Any, Any]] = {}
        if legacy:
            group = root["model_weights"] if "model_weights" in root else root
            for top in group:
                names = group[top].attrs.get("weight_names", [])
                for raw in names:
                    wname = raw.decode() if isinstance(raw, bytes) else str(raw)
                    parts = wname.split(":")[0].split("/")
                    if wname in group[top]:
                        ds = group[top][wname]
                    elif wname in group:
                        ds = group[wname]
                    else:
                        continue
                    layer = "/".join(parts[:-1]) if len(parts) > 1 else top
                    self.by_layer.setdefault(layer.split("/")[-1], {})[parts[-1]] = ds
        else:
            self._walk(root.get("layers"))

    def _walk(self, group: Any) -> None:
        if group is None:
            return
        for key in group:
            child = group[key]
            vars_ = child.get("vars")
            if vars_ is not None:
                name = vars_.attrs.get("name", key)
                name = name.decode() if isinstance(name, bytes) else str(name)
                self.by_layer[name] = {int(i): vars_[i] for i in vars_ if i.isdigit()}
            self._walk(child.get("layers"))

    def kernel(self, layer_path: str, cls: str) -> Any:
        index, keras2_name = _KERNEL_VAR.get(cls, (0, "kernel"))
        found = self.by_layer.get(layer_path.split("/")[-1], {})
        if not self.legacy:
            return found.get(index)
        # Keras 2 names the variable (`depthwise_kernel`), Keras 3's legacy writer `kernel`
        # for both; weight_names lists them in variable order
        ordered = list(found.values())
        return found.get(keras2_name, found.get("kernel", ordered[index] if ordered else None))


def read_keras(path: str) -> GraphWeights:
    """The depthwise layers of a Keras `.keras` (zip) or legacy `.h5` model file.

    Returns `GraphWeights`: `layers` with kernels `[C·M, H, W]` float32 (stride and dilation from
    the layer config), `regular` the other Conv2D kernels as `[O, I, H, W]` by reference, and
    `details` `{"batch_norm", "weights", "keras_version"}`.
    Raises CheckpointError (one line naming the file) for a corrupt file, or one without a model
    config or weights.
    """
    try:
        h5, legacy, config, version = _open(path)
        with h5:
            return _read(path, h5, legacy, config, version)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile,
            UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt Keras file "
                              f"({type(e).__name__}: {e})") from None


def _open(path: str) -> tuple[Any, bool, dict, str]:
    """`(h5py.File of the weights, legacy layout?, model config, keras version)`."""
    h5py = _import_h5py(path)
    with open(path, "rb") as f:
        legacy = f.read(8) == HDF5_MAGIC
    if legacy:
        h5 = h5py.File(path, "r")
        raw_config = h5.attrs.get("model_config")
        if raw_config is None:
            h5.close()
            raise CheckpointError(f"{path}: HDF5 file without a Keras model_config (a "
                                  "weights-only file cannot say which layers are depthwise)")
        version = h5.attrs.get("keras_version", "")
        if "model_weights" not in h5 or not len(h5["model_weights"]):
            h5.close()
            raise CheckpointError(f"{path}: Keras file without weights (no model_weights)")
    else:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise CheckpointError(f"{path}: .keras archive without config.json")
            if "model.weights.h5" not in names:
                raise CheckpointError(f"{path}: Keras file without weights "
                                      "(no model.weights.h5 in the archive)")
            raw_config = zf.read("config.json")
            meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
            version = meta.get("keras_version", "")
            # a zip member cannot be memory-mapped; h5py reads the weights from the bytes
            h5 = h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r")
    config = json.loads(raw_config.decode() if isinstance(raw_config, bytes) else raw_config)
    version = version.decode() if isinstance(version, bytes) else str(version)
    return h5, legacy, config, version


def _read(path: str, h5: Any, legacy: bool, config: dict, version: str) -> GraphWeights:
    weights = _Weights(path, h5, legacy)
    if not weights.by_layer:
        raise CheckpointError(f"{path}: Keras file without weights")
    all_layers = list(_layers(config))
    consumers: dict[str, set[str]] = {}
    classes = {}
    for lpath, layer, parents in all_layers:
        classes[lpath] = layer.get("class_name")
        for src in _inbound(layer):
            consumers.setdefault("/".join(parents + [src]), set()).add(lpath)
    # Sequential models list no inbound nodes: each layer feeds the next
    for lpath, layer, _ in all_layers:
        if layer.get("class_name") == "Sequential":
            inner = [p for p, _, parents in all_layers if parents == lpath.split("/")]
            for a, b in zip(inner, inner[1:]):
                consumers.setdefault(a, set()).add(b)
    if config.get("class_name") == "Sequential":
        top = [p for p, _, parents in all_layers if not parents]
        for a, b in zip(top, top[1:]):
            consumers.setdefault(a, set()).add(b)
    layers: list[DepthwiseLayer] = []
    regular: dict[str, TensorRef] = {}
    followed, stored = [], []
    for lpath, layer, _ in all_layers:
        cls = layer.get("class_name")
        if cls not in _KERNEL_VAR:
            continue
        ds = weights.kernel(lpath, cls)
        if ds is None:
            raise CheckpointError(f"{path}: no kernel for {cls} layer {lpath!r} in the weights")
        shape = tuple(ds.shape)
        cfg = layer.get("config", {})
        if _depthwise_kind(layer, shape):
            if len(shape) != 4:
                raise CheckpointError(f"{path}: {cls} {lpath!r} kernel has shape {shape}")
            k = np.asarray(ds[()])
            stored.append(k.dtype.name)
            k = k.astype(np.float32)
            if not np.isfinite(k).all():
                raise CheckpointError(f"{path}: {cls} {lpath!r} kernel holds NaN or Inf")
            h, w, c, m = k.shape
            kernels = k.transpose(2, 3, 0, 1).reshape(c * m, h, w)
            if kernels.shape[0] < 2 or h * w < 2:
                continue
            layers.append(DepthwiseLayer(len(layers), lpath, np.ascontiguousarray(kernels),
                                         stride=_square(cfg.get("strides")),
                                         dilation=_square(cfg.get("dilation_rate"))))
            followed.append(any(classes.get(c) == "BatchNormalization"
                                for c in consumers.get(lpath, ())))
        elif cls == "Conv2D" and len(shape) == 4 and shape[0] * shape[1] > 1:
            regular[f"{lpath}.weight"] = TensorRef(
                (shape[3], shape[2], shape[0], shape[1]), lambda d=ds.name: _regular(path, d))
    if not layers:
        raise CheckpointError(f"{path}: no depthwise layer (DepthwiseConv2D, SeparableConv2D) "
                              "in this Keras model")
    details = {"batch_norm": batch_norm_state(followed), "weights": sorted(set(stored))}
    if version:
        details["keras_version"] = version
    return GraphWeights(layers, regular, details)


def _regular(path: str, dataset: str) -> np.ndarray:
    """A Conv2D kernel `[H, W, I, O]` as `[O, I, H, W]`, read again from the file (the file is
    closed once the depthwise layers are read)."""
    h5 = _open(path)[0]
    with h5:
        return np.ascontiguousarray(np.asarray(h5[dataset][()], np.float32).transpose(3, 2, 0, 1))


def _square(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value and len(set(value)) == 1:
        return int(value[0])
    return -1
