"""Depthwise convolutions of an ONNX model, read with the `onnx` package (no onnxruntime).

A `Conv` (or `QLinearConv`) node is depthwise when `group` > 1 and its weight is
`[C·M, 1, kh, kw]`: one input channel per group, so group = input channels C, and M = the channel
multiplier. ONNX's Conv is a cross-correlation over `[N, C, H, W]` with the weight in PyTorch's
orientation, so kernel o is `weight[o, 0]` (row = y, column = x), exactly what a `.pth` holds.

The weight reaches the node from an initializer (raw or typed fields, or an external data file
beside the model), a `Constant` node, or through `Identity`, `Cast` (fp16 weights) and
`DequantizeLinear` (int8/uint8/int16 with per-tensor, per-axis or blocked scale and zero point:
`(q - zero_point) · scale`, computed exactly and rounded once to float32); `QLinearConv` carries
its weight's scale and zero point itself. Layers come in node order (ONNX graphs are
topologically sorted), named by node name (the output's name where a node has none). Nodes in
subgraphs (`If`, `Loop`) and model-local functions are not searched.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from dwjax.errors import CheckpointError
from dwjax.io.extract import (
    DepthwiseLayer,
    GraphWeights,
    TensorRef,
    batch_norm_state,
    is_depthwise_shape,
)

# Ops a constant weight passes through unchanged in value (Cast changes only the dtype).
_PASS_THROUGH = ("Identity", "Cast")


def _import_onnx(path: str):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError(
            f"{path}: reading ONNX needs the onnx package: pip install 'dwjax[formats]'"
        ) from None
    return onnx, numpy_helper


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class _Graph:
    """The main graph's constants by name and every value's producer and consumers."""

    def __init__(self, path: str, model: Any, onnx: Any, numpy_helper: Any):
        self.path, self.onnx, self.numpy_helper = path, onnx, numpy_helper
        self.base_dir = os.path.dirname(os.path.abspath(path))
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def _constant_tensor(self, node: Any) -> Any:
        for a in node.attribute:
            if a.name == "value":
                return a.t
        return None

    def shape(self, name: str, depth: int = 0) -> tuple[int, ...] | None:
        """The shape of a constant value without reading it; None when it is computed at run
        time (or stored in a form this reader does not follow)."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        node = self.producer.get(name)
        if node is None or depth > 16:
            return None
        if node.op_type == "Constant":
            t = self._constant_tensor(node)
            return tuple(t.dims) if t is not None else None
        if node.op_type in _PASS_THROUGH or node.op_type == "DequantizeLinear":
            return self.shape(node.input[0], depth + 1)
        return None

    def tensor(self, t: Any) -> np.ndarray:
        try:
            return self.numpy_helper.to_array(t, self.base_dir)
        except Exception as e:  # a missing external file, a short raw_data, an unknown dtype
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r} unreadable ({_first_line(e)})"
            ) from None

    def value(self, name: str, depth: int = 0) -> np.ndarray:
        """A constant value as stored (integers stay integers) or dequantised to float32."""
        if name in self.initializers:
            return self.tensor(self.initializers[name])
        node = self.producer.get(name)
        if node is None or depth > 16:
            raise CheckpointError(f"{self.path}: weight {name!r} is not a constant in the file")
        if node.op_type == "Constant":
            t = self._constant_tensor(node)
            if t is None:
                raise CheckpointError(f"{self.path}: Constant {node.name!r} has no tensor value")
            return self.tensor(t)
        if node.op_type in _PASS_THROUGH:
            return self.value(node.input[0], depth + 1)
        if node.op_type == "DequantizeLinear":
            x = self.value(node.input[0], depth + 1)
            scale = self.value(node.input[1], depth + 1)
            zero = (self.value(node.input[2], depth + 1)
                    if len(node.input) > 2 and node.input[2] else None)
            return dequantize(x, scale, zero, self.attr(node, "axis", 1),
                              self.attr(node, "block_size", 0), f"{self.path}: {node.name!r}")
        raise CheckpointError(f"{self.path}: weight {name!r} is computed by a "
                              f"{node.op_type} node at run time, not stored")

    def stored_dtype(self, name: str, depth: int = 0) -> str:
        """The element type the weight is stored in (`float32`, `float16`, `int8`…)."""
        if name in self.initializers:
            dtype = self.initializers[name].data_type
            return self.onnx.helper.tensor_dtype_to_np_dtype(dtype).name
        node = self.producer.get(name)
        if node is not None and depth < 16:
            if node.op_type == "Constant":
                t = self._constant_tensor(node)
                if t is not None:
                    return self.onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
            if node.op_type in _PASS_THROUGH or node.op_type == "DequantizeLinear":
                return self.stored_dtype(node.input[0], depth + 1)
        return "unknown"


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int,
               block_size: int, where: str) -> np.ndarray:
    """`(q - zero) · scale` as float32, rounded once: per tensor (scalar scale), per axis (scale
    `[q.shape[axis]]`) or blocked (scale shaped like q with `ceil(dim / block_size)` on `axis`).

    Args:
      q: the stored integers (or floats) of any shape.
      scale: float scale(s); zero: the zero point(s) in q's type, or None for 0.
    """
    q64 = q.astype(np.float64)
    s64 = np.asarray(scale, np.float64)
    z64 = np.zeros(()) if zero is None else np.asarray(zero, np.float64)
    if s64.size > 1 or s64.ndim == q.ndim and q.ndim > 0:
        axis = axis % q.ndim
        if block_size and block_size > 0:
            s64 = np.repeat(s64, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
            if z64.ndim:
                z64 = np.repeat(z64, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        elif s64.ndim == 1 and s64.size == q.shape[axis]:
            bcast = [1] * q.ndim
            bcast[axis] = -1
            s64 = s64.reshape(bcast)
            z64 = z64.reshape(bcast) if z64.size > 1 else z64
        else:
            raise CheckpointError(
                f"{where}: scale of shape {s64.shape} does not fit a weight of shape {q.shape} "
                f"on axis {axis}")
    # the product of a float32 scale and an integer difference is exact in float64, so one
    # rounding to float32 gives the correctly rounded value
    return ((q64 - z64) * s64).astype(np.float32)


def read_onnx(path: str) -> GraphWeights:
    """The depthwise layers of an ONNX model file, in node order.

    Returns `GraphWeights`: `layers` with kernels `[C·M, kh, kw]` float32 (stride and dilation
    from the node), `regular` the other 4-D Conv weights `[O, I, kh, kw]` by reference, `details`
    `{"batch_norm", "weights"}` (the stored element types of the depthwise weights).
    Raises CheckpointError (one line naming the file) for unreadable or truncated files.
    """
    onnx, numpy_helper = _import_onnx(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, a short read: all mean a broken file
        raise CheckpointError(
            f"{path}: truncated or corrupt ONNX file ({_first_line(e)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise CheckpointError(f"{path}: not an ONNX model (no graph nodes)")
    g = _Graph(path, model, onnx, numpy_helper)
    layers: list[DepthwiseLayer] = []
    regular: dict[str, TensorRef] = {}
    followed, stored = [], []
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "QLinearConv"):
            continue
        w_index = 1 if node.op_type == "Conv" else 3
        if len(node.input) <= w_index:
            raise CheckpointError(f"{path}: {node.op_type} node {node.name!r} has no weight input")
        w_name = node.input[w_index]
        shape = g.shape(w_name)
        if shape is None or len(shape) != 4:
            continue  # a weight computed at run time, or a 1-D/3-D convolution
        name = node.name or node.output[0]
        group = int(g.attr(node, "group", 1))
        if group > 1 and is_depthwise_shape(shape):
            w = _conv_weight(g, node, w_name)
            if w.shape != shape:
                raise CheckpointError(f"{path}: weight {w_name!r} has shape {w.shape}, "
                                      f"its header says {shape}")
            strides = list(g.attr(node, "strides", [1, 1]))
            dilations = list(g.attr(node, "dilations", [1, 1]))
            layers.append(DepthwiseLayer(
                len(layers), name, np.ascontiguousarray(w[:, 0], np.float32),
                stride=strides[0] if len(set(strides)) == 1 else -1,
                dilation=dilations[0] if len(set(dilations)) == 1 else -1))
            followed.append(any(c.op_type == "BatchNormalization"
                                for c in g.consumers.get(node.output[0], [])))
            stored.append(g.stored_dtype(w_name))
        elif not is_depthwise_shape(shape) and shape[2] * shape[3] > 1:
            regular[f"{name}.weight"] = TensorRef(
                shape, lambda g=g, node=node, w=w_name: _conv_weight(g, node, w))
    if not layers:
        raise CheckpointError(f"{path}: no depthwise Conv node (group = input channels > 1) in "
                              "this ONNX graph")
    details = {"batch_norm": batch_norm_state(followed), "weights": sorted(set(stored))}
    return GraphWeights(layers, regular, details, _external_files(g))


def _external_files(g: _Graph) -> list[str]:
    """The external data files the initializers name, in first-use order."""
    found: list[str] = []
    for t in g.initializers.values():
        for entry in t.external_data:
            path = os.path.join(g.base_dir, entry.value)
            if entry.key == "location" and path not in found and os.path.isfile(path):
                found.append(path)
    return found


def _conv_weight(g: _Graph, node: Any, w_name: str) -> np.ndarray:
    """A Conv's weight as float32 `[O, I, kh, kw]`; a QLinearConv's dequantised by its own
    scale and zero point (per output channel or per tensor)."""
    w = g.value(w_name)
    if node.op_type == "QLinearConv":
        zero = g.value(node.input[5]) if len(node.input) > 5 and node.input[5] else None
        w = dequantize(w, g.value(node.input[4]), zero, 0, 0, f"{g.path}: {node.name!r}")
    if w.dtype.kind in "iub":  # (bfloat16 and float8 come from ml_dtypes, kind "V")
        raise CheckpointError(f"{g.path}: weight {w_name!r} of Conv {node.name!r} is stored as "
                              f"{w.dtype} without a DequantizeLinear")
    w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise CheckpointError(f"{g.path}: weight {w_name!r} holds NaN or Inf")
    return w
