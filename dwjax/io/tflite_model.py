"""Depthwise convolutions of a TFLite flatbuffer, read with the `tflite` package (the published
schema's generated reader) over a memory map of the file: only the filters are copied out.

A `DEPTHWISE_CONV_2D` op's filter is `[1, H, W, C·M]` (NHWC; output channel o = c·M + m), and
TFLite's convolution is a cross-correlation like PyTorch's, so kernel o is `filter[0, :, :, o]`
(row = y, column = x): the same `[C·M, H, W]` a PyTorch `[C·M, 1, H, W]` weight gives.

The filter is a constant tensor (its bytes in the flatbuffer, or past its end at a buffer's
`offset`/`size`), or the output of `DEQUANTIZE` (fp16 weights; int8 ones with scales) or of
`DENSIFY` (TFLite's sparse format: per-dimension dense or CSR metadata in a traversal order,
optionally with block dimensions), chained as the converter writes them. A quantised integer
filter is dequantised with its scale and zero point, per tensor or per channel along
`quantized_dimension`. Layers come in op order of each subgraph, named by the filter tensor's name.
TFLite has no batch-norm op: a converter folds batch norm into the filter, so `batch_norm` is
always `"none"` (folded, or never there).
"""
from __future__ import annotations

import mmap
import struct
from typing import Any

import numpy as np

from dwjax.errors import CheckpointError
from dwjax.io.extract import DepthwiseLayer, GraphWeights, TensorRef, batch_norm_state

DEPTHWISE_CONV_2D, CONV_2D, DEQUANTIZE, DENSIFY = 4, 3, 6, 124
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16,
           9: np.int8, 10: np.float64, 15: np.uint32, 16: np.uint16}
_DENSE = 0


def _import_tflite(path: str):
    try:
        import tflite
    except ImportError:
        raise CheckpointError(
            f"{path}: reading TFLite needs the tflite package: pip install 'dwjax[formats]'"
        ) from None
    return tflite


def densify(values: np.ndarray, shape: tuple[int, ...], traversal_order: list[int],
            block_map: list[int], levels: list[tuple[int, int, np.ndarray, np.ndarray]]
            ) -> np.ndarray:
    """TFLite's sparse tensor → dense (the format converter's decoding, vectorised).

    Args:
      values: the stored non-zero entries (or blocks), in traversal order.
      shape: the dense shape; traversal_order: one entry per level, the original dimensions
        first, then `rank + b` for the block dimension of `block_map[b]`.
      levels: per level `(format, dense_size, array_segments, array_indices)`; format 0 is
        dense (all `dense_size` coordinates), 1 is CSR (coordinates `indices[seg[p]:seg[p+1]]`
        for parent position p).

    Returns:
      The dense array of `shape`, zeros where nothing is stored.
    """
    rank = len(shape)
    coords = np.zeros((1, 0), np.int64)
    parent = np.zeros(1, np.int64)  # each path's position at the previous level
    for fmt, size, segments, indices in levels:
        if fmt == _DENSE:
            coord = np.tile(np.arange(size, dtype=np.int64), len(parent))
            coords = np.repeat(coords, size, axis=0)
            parent = np.repeat(parent, size) * size + coord
        else:
            starts, stops = segments[parent], segments[parent + 1]
            counts = stops - starts
            pos = (np.arange(counts.sum(), dtype=np.int64)
                   - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts))
            coord = indices[pos].astype(np.int64)
            coords = np.repeat(coords, counts, axis=0)
            parent = pos
        coords = np.column_stack([coords, coord])
    dense_idx = np.zeros((len(coords), rank), np.int64)
    for level in range(rank):
        dense_idx[:, traversal_order[level]] = coords[:, level]
    for level in range(rank, len(levels)):
        b = traversal_order[level] - rank
        dim = block_map[b]
        dense_idx[:, dim] = dense_idx[:, dim] * levels[rank + b][1] + coords[:, level]
    if len(coords) != values.size or (dense_idx >= np.array(shape)).any():
        raise ValueError(f"sparse metadata describes {len(coords)} values, {values.size} stored")
    out = np.zeros(shape, values.dtype)
    out[tuple(dense_idx.T)] = values.reshape(-1)
    return out


class _Reader:
    def __init__(self, path: str, buf: Any, model: Any, tflite: Any):
        self.path, self.buf, self.model, self.tfl = path, buf, model, tflite

    def raw(self, tensor: Any) -> np.ndarray | None:
        """A tensor's stored values with its dense shape (densified if sparse), or None when it
        has no bytes (computed at run time)."""
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer is None:
            return None
        if buffer.Offset() > 1:  # stored past the flatbuffer (models over 2 GB)
            data = np.frombuffer(self.buf, np.uint8, buffer.Size(), buffer.Offset())
        elif buffer.DataLength():
            data = buffer.DataAsNumpy()
        else:
            return None
        dtype = _DTYPES.get(tensor.Type())
        name = tensor.Name().decode("utf-8", "replace")
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported element "
                                  f"type ({tensor.Type()})")
        values = np.array(data).view(dtype)
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        sparsity = tensor.Sparsity()
        if sparsity is not None:
            return densify(values, shape, list(sparsity.TraversalOrderAsNumpy()),
                           list(sparsity.BlockMapAsNumpy()) if sparsity.BlockMapLength() else [],
                           [self._level(sparsity.DimMetadata(i))
                            for i in range(sparsity.DimMetadataLength())])
        return values.reshape(shape)

    def _level(self, dm: Any) -> tuple[int, int, np.ndarray, np.ndarray]:
        if dm.Format() == _DENSE:
            return _DENSE, int(dm.DenseSize()), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return (dm.Format(), int(dm.DenseSize()),
                self._index_vector(dm.ArraySegmentsType(), dm.ArraySegments()),
                self._index_vector(dm.ArrayIndicesType(), dm.ArrayIndices()))

    def _index_vector(self, kind: int, table: Any) -> np.ndarray:
        vector = {1: self.tfl.Int32Vector, 2: self.tfl.Uint16Vector,
                  3: self.tfl.Uint8Vector}[kind]()
        vector.Init(table.Bytes, table.Pos)
        return vector.ValuesAsNumpy().astype(np.int64)

    def value(self, sg: Any, index: int, producers: dict[int, Any], codes: list[int],
              depth: int = 0) -> tuple[np.ndarray, str]:
        """A constant tensor as float32 `(array, stored element type)`, following DEQUANTIZE
        and DENSIFY ops back to the stored bytes and dequantising quantised integers."""
        tensor = sg.Tensors(index)
        name = tensor.Name().decode("utf-8", "replace")
        raw = self.raw(tensor)
        if raw is None:
            op = producers.get(index)
            code = codes[op.OpcodeIndex()] if op is not None else None
            if code in (DEQUANTIZE, DENSIFY) and depth < 8:
                return self.value(sg, op.Inputs(0), producers, codes, depth + 1)
            raise CheckpointError(f"{self.path}: filter {name!r} is computed at run time, "
                                  "not stored")
        stored = np.dtype(raw.dtype).name
        if raw.dtype.kind in "iu":
            q = tensor.Quantization()
            if q is None or not q.ScaleLength():
                raise CheckpointError(f"{self.path}: integer filter {name!r} without "
                                      "quantisation scales")
            scale = q.ScaleAsNumpy().astype(np.float64)
            zero = (q.ZeroPointAsNumpy().astype(np.float64) if q.ZeroPointLength()
                    else np.zeros(1))
            if scale.size > 1:
                bcast = [1] * raw.ndim
                bcast[q.QuantizedDimension()] = -1
                scale, zero = scale.reshape(bcast), zero.reshape(bcast) if zero.size > 1 else zero
            # exact in float64, rounded once to float32
            return ((raw.astype(np.float64) - zero) * scale).astype(np.float32), stored
        return raw.astype(np.float32), stored


def read_tflite(path: str) -> GraphWeights:
    """The depthwise layers of a `.tflite` model, in op order.

    Returns `GraphWeights`: `layers` with kernels `[C·M, H, W]` float32 (stride and dilation from
    the op's options), `regular` the CONV_2D filters as `[O, I, H, W]` by reference, `details`
    `{"batch_norm": "none", "weights": stored element types of the filters}`.
    Raises CheckpointError (one line naming the file) for a corrupt or truncated file, or one
    without any DEPTHWISE_CONV_2D op.
    """
    tfl = _import_tflite(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise CheckpointError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        return _read(path, buf, tfl)
    except CheckpointError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, AttributeError, KeyError,
            OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt TFLite file "
                              f"({type(e).__name__}: {e})") from None


def _read(path: str, buf: Any, tfl: Any) -> GraphWeights:
    model = tfl.Model.GetRootAs(buf, 0)
    reader = _Reader(path, buf, model, tfl)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(max(int(oc.DeprecatedBuiltinCode()), int(oc.BuiltinCode())))
    layers: list[DepthwiseLayer] = []
    regular: dict[str, TensorRef] = {}
    stored = []
    many = model.SubgraphsLength() > 1
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        ops = [sg.Operators(i) for i in range(sg.OperatorsLength())]
        producers = {int(op.Outputs(j)): op for op in ops for j in range(op.OutputsLength())}
        for op in ops:
            code = codes[op.OpcodeIndex()]
            if code not in (DEPTHWISE_CONV_2D, CONV_2D) or op.InputsLength() < 2:
                continue
            index = int(op.Inputs(1))
            tensor = sg.Tensors(index)
            name = tensor.Name().decode("utf-8", "replace")
            name = f"subgraph{s}/{name}" if many else name
            shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
            if code == CONV_2D:
                if len(shape) == 4 and shape[1] * shape[2] > 1:
                    regular[f"{name}.weight"] = TensorRef(
                        (shape[0], shape[3], shape[1], shape[2]),
                        lambda sg=sg, i=index, p=producers: np.ascontiguousarray(
                            reader.value(sg, i, p, codes)[0].transpose(0, 3, 1, 2)))
                continue
            w, dtype = reader.value(sg, index, producers, codes)
            if w.ndim != 4 or w.shape[0] != 1:
                raise CheckpointError(f"{path}: depthwise filter {name!r} has shape {w.shape}, "
                                      "not [1, H, W, C]")
            if not np.isfinite(w).all():
                raise CheckpointError(f"{path}: depthwise filter {name!r} holds NaN or Inf")
            stride, dilation = _stride_dilation(op, tfl)
            layers.append(DepthwiseLayer(len(layers), name,
                                         np.ascontiguousarray(w[0].transpose(2, 0, 1)),
                                         stride=stride, dilation=dilation))
            stored.append(dtype)
    if not layers:
        raise CheckpointError(f"{path}: no DEPTHWISE_CONV_2D op in this TFLite model")
    return GraphWeights(layers, regular, {"batch_norm": batch_norm_state([False] * len(layers)),
                                          "weights": sorted(set(stored))})


def _stride_dilation(op: Any, tfl: Any) -> tuple[int, int]:
    if op.BuiltinOptionsType() != tfl.BuiltinOptions.DepthwiseConv2DOptions:
        return -1, -1
    table = op.BuiltinOptions()
    opts = tfl.DepthwiseConv2DOptions()
    opts.Init(table.Bytes, table.Pos)
    stride = opts.StrideH() if opts.StrideH() == opts.StrideW() else -1
    dilation = (opts.DilationHFactor() if opts.DilationHFactor() == opts.DilationWFactor()
                else -1)
    return stride, dilation
