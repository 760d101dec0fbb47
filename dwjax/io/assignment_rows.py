"""One assignment row, defined once: the `Rows` a classifier gives and the schema every row file
has (Parquet and CSV alike), with the conversions between them.

A row file's columns are `ROW_SCHEMA`: where the kernel comes from (`source`, `layer`,
`layer_name`, `channel`, `kernel_size`, from the shard's metadata) and what assignment found
(`Rows`: `code`, `dissimilarity`, `clustered`, `label`, `total_activation`, `norm`). Text
columns are Arrow dictionaries: a part has one source, a few layer names and a few labels.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa

# The label slots that are not a class: a live kernel too far from every code, and a kernel with
# no pattern (constant or negligible). A classifier's label dictionary ends with both.
UNCLUSTERED, DEAD = "Unclustered", "Dead"

_TEXT = pa.dictionary(pa.int32(), pa.string())
# Every column is required (never null: a dead kernel's code and dissimilarity are NaN), so a
# writer builds no definition levels (BENCHMARKS.md, "cheaper part writes").
ROW_SCHEMA = pa.schema([pa.field(name, kind, nullable=False) for name, kind in [
    ("source", _TEXT), ("layer", pa.int32()), ("layer_name", _TEXT), ("channel", pa.int32()),
    ("kernel_size", pa.int32()), ("code", pa.float64()), ("dissimilarity", pa.float32()),
    ("clustered", pa.bool_()), ("label", _TEXT), ("total_activation", pa.float32()),
    ("norm", pa.float32()),
]])
COLUMNS = tuple(ROW_SCHEMA.names)
# Dictionary pages only where they pay: the text columns, and `code` (at most num_codes distinct
# values: its dictionary makes the write faster and the file smaller); the other numeric columns
# would spend most of the write time building dictionaries they then drop.
DICTIONARY_COLUMNS = [f.name for f in ROW_SCHEMA if pa.types.is_dictionary(f.type)] + ["code"]
# Min/max statistics where they let a reader skip row groups (a source, layer, channel): not on
# the measured floats, which no reader filters by, nor on the label, whose range spans nearly
# every label in every row group (a filter on it skips nothing); each costs write time.
STATISTICS_COLUMNS = [f.name for f in ROW_SCHEMA
                      if not pa.types.is_floating(f.type) and f.name != "label"]
# Compression only where it pays (figures: BUILD_NOTES.md, "Assignment rows"): zstd saves little
# on the measured floats and the code's dictionary indices (near-random bits) and nothing on the
# one-value and run-length text columns, at a large share of the write time; it halves the
# label's indices. The integer ids are delta-encoded instead (a layer's channels count up by one),
# which makes them nearly free without a codec.
COMPRESSION = {name: ("zstd" if name == "label" else "none") for name in COLUMNS}
ENCODINGS = {name: "DELTA_BINARY_PACKED" for name in ("layer", "channel", "kernel_size")}


class Rows(NamedTuple):
    """What a classifier gives for n kernels, every column `[n]`, in kernel order."""
    code: np.ndarray              # float64: the nearest code (k-means: cluster id); NaN if dead
    dissimilarity: np.ndarray     # float32: to that code's reconstruction; NaN if dead
    clustered: np.ndarray         # bool
    label_index: np.ndarray       # int32 into the classifier's label names
    total_activation: np.ndarray  # float32: sum of the raw kernel's weights
    norm: np.ndarray              # float32: L2 norm of the raw kernel

    @staticmethod
    def empty() -> "Rows":
        return Rows(*(np.empty(0, _dtype(name)) for name in Rows._fields))

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        if not parts:
            return Rows.empty()
        return Rows(*(np.concatenate(cols) for cols in zip(*parts)))

    def typed(self) -> "Rows":
        """The same rows with every column in its schema dtype."""
        return Rows(*(np.asarray(v, _dtype(name)) for name, v in zip(Rows._fields, self)))


def _dtype(field: str) -> np.dtype:
    if field == "label_index":
        return np.dtype(np.int32)
    return np.dtype(ROW_SCHEMA.field(field).type.to_pandas_dtype())


class Where(NamedTuple):
    """Where n rows come from: one source, a layer and channel per row, and the layer names the
    rows point into by `layer_pos` (positions in `layer_names`)."""
    source: str
    kernel_size: int
    layer: np.ndarray       # int32 [n]
    layer_pos: np.ndarray   # int32 [n] into layer_names
    layer_names: list[str]
    channel: np.ndarray     # int32 [n]


def table(where: Where, rows: Rows, label_names: Sequence[str]) -> pa.Table:
    """One block of a row file, as Arrow, in `ROW_SCHEMA`."""
    n = len(rows.code)
    rows = rows.typed()
    columns = {
        "source": _dictionary(np.zeros(n, np.int32), [where.source]),
        "layer": _arrow(np.asarray(where.layer, np.int32)),
        "layer_name": _dictionary(where.layer_pos, where.layer_names),
        "channel": _arrow(np.asarray(where.channel, np.int32)),
        "kernel_size": _arrow(np.full(n, where.kernel_size, np.int32)),
        "label": _dictionary(rows.label_index, label_names),
    }
    columns.update({name: _arrow(v) for name, v in zip(Rows._fields, rows)
                    if name != "label_index"})
    return pa.Table.from_arrays([columns[name] for name in COLUMNS], schema=ROW_SCHEMA)


def text_rows(where: Where, rows: Rows, label_names: Sequence[str]) -> list[tuple]:
    """The same block as CSV rows in `COLUMNS` order: numbers as `%.6g` text, NaN empty, booleans
    as 0/1."""
    n = len(rows.code)
    rows = rows.typed()
    names = np.asarray(list(where.layer_names) + [""], dtype=object)[where.layer_pos]
    labels = np.asarray(list(label_names), dtype=object)[rows.label_index]
    values = {"source": [where.source] * n, "layer": np.asarray(where.layer).tolist(),
              "layer_name": names.tolist(), "channel": np.asarray(where.channel).tolist(),
              "kernel_size": [where.kernel_size] * n, "label": labels.tolist(),
              "clustered": rows.clustered.astype(int).tolist()}
    for name in ("code", "dissimilarity", "total_activation", "norm"):
        values[name] = [_fmt(x) for x in getattr(rows, name).tolist()]
    return list(zip(*(values[name] for name in COLUMNS)))


def from_arrow(table: pa.Table, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns `{name: [n]}` of a row file read with pyarrow; text columns as object arrays.

    A dictionary column's rows point at one str per distinct value (8 bytes a row), not a str
    each: a part's label column is a handful of names over millions of rows.
    """
    out = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            chunks = [np.asarray(c.dictionary.to_pylist() + [None], dtype=object)[
                np.asarray(c.indices.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)]
                for c in col.chunks]
            out[name] = (np.concatenate(chunks) if chunks else np.zeros(0, dtype=object))
        else:
            out[name] = col.to_numpy()
    return out


def from_text(column: str, values: list[str]) -> np.ndarray:
    """A CSV column back to the dtype its Parquet twin has (`ROW_SCHEMA`)."""
    kind = ROW_SCHEMA.field(column).type
    if pa.types.is_dictionary(kind):
        return np.asarray(values, dtype=object)
    if pa.types.is_boolean(kind):
        return np.asarray(values) == "1"
    if pa.types.is_integer(kind):
        return np.asarray(values, kind.to_pandas_dtype())
    return np.asarray([float(v) if v else np.nan for v in values], kind.to_pandas_dtype())


def _fmt(x: float) -> str:
    return "" if x != x else format(x, ".6g")


# numpy → Arrow by buffers: pa.array() imports pandas on its first call, and these columns need
# none of its conversions.
def _arrow(values: np.ndarray) -> pa.Array:
    """A numeric or bool `[n]` array → pyarrow Array (zero-copy except bools, bit-packed)."""
    values = np.ascontiguousarray(values, values.dtype.newbyteorder("="))  # native byte order
    if values.dtype == bool:
        data = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(data)])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def _arrow_strings(values: Sequence[str]) -> pa.Array:
    """Python strings → pyarrow string Array."""
    data = [v.encode() for v in values]
    offsets = np.cumsum([0] + [len(b) for b in data], dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(data),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def _dictionary(index: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(_arrow(np.asarray(index, np.int32)),
                                          _arrow_strings(list(values)))
