"""The master-key files under `<workdir>/masterkeys/` (RunDir.masterkeys): written by
`masterkeys`, read by `report`.

    bank.txt          the bank in masterfiltmodel's text format: a block per filter, `Filter i:`
                      (i from 1) then k lines of k numbers, blocks separated by a blank line
    bank.npy          float32 [K, k, k], the same filters, centred and unit (row `filter` j is
                      bank.npy[j], bank.txt's `Filter j+1:`)
    coverage.csv      mean explained fraction of the sampled kernels for K = 1, 2, …: the bank's
                      greedy order, single PCA components, the PCA subspace, k-means centroids
    functional.csv    the functional check (top-1 agreement, logit cosine per K and control)
    rows/<shard dir>.k5x5[.r<start>-<stop>].parquet   one part's rows (`ROW_SCHEMA`)
    rows/_meta/<row file stem>.json                   its statistics (kernels per filter and
                                                      per layer, as assignment statistics are)
    rows/_meta/settings.json, summary.json            what the rows were made with; totals

Rows live in their own folder so `pyarrow.parquet.read_table("<workdir>/masterkeys/rows")` reads
a whole job. Parts, resume and workers are `io.assignment_files`' (`Part`, `plan_parts`,
`is_done`, `read_stats`, `remove_stale`, the settings check): a part is done when its statistics
name the same shard content and row range, and its row file, renamed into place last, exists.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import re
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from dwjax.errors import UserError
from dwjax.io import assignment_files, assignment_rows, atomic, shards

DEAD = assignment_rows.DEAD
_TEXT = pa.dictionary(pa.int32(), pa.string())
ROW_SCHEMA = pa.schema([
    ("source", _TEXT), ("layer", pa.int32()), ("channel", pa.int32()), ("filter", pa.int32()),
    ("scale", pa.float32()), ("offset", pa.float32()), ("r2", pa.float32()),
])
COLUMNS = tuple(ROW_SCHEMA.names)
FORMAT = "parquet"


class BankFileError(UserError):
    """A bank file is unreadable or not a bank of square filters (one-line message)."""


def bank_txt(folder: str) -> str:
    return os.path.join(folder, "bank.txt")


def bank_npy(folder: str) -> str:
    return os.path.join(folder, "bank.npy")


def coverage_csv(folder: str) -> str:
    return os.path.join(folder, "coverage.csv")


def functional_csv(folder: str) -> str:
    return os.path.join(folder, "functional.csv")


def rows_dir(folder: str) -> str:
    return os.path.join(folder, "rows")


def filter_names(num_filters: int) -> list[str]:
    """The statistics' label slots: `filter 0` … `filter K-1`, then `Dead`."""
    return [f"filter {j}" for j in range(num_filters)] + [DEAD]


# ----------------------------------------------------------------------------- the bank
_HEADER = re.compile(r"^\s*filter\s+(\d+)\s*:?\s*$", re.IGNORECASE)


def read_bank_text(path: str) -> np.ndarray:
    """A bank file in masterfiltmodel's text format → `[K, k, k]` float64, in file order.

    Raises BankFileError naming the file: unreadable, no `Filter i:` block, a block that is not
    k lines of k numbers, filters of different sizes, a non-finite value.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BankFileError(f"{path}: cannot read the bank file ({getattr(e, 'strerror', e)})")
    blocks: list[tuple[str, list[list[float]]]] = []
    for number, line in enumerate(lines, 1):
        if _HEADER.match(line):
            blocks.append((line.strip(), []))
        elif line.strip():
            if not blocks:
                raise BankFileError(f"{path}: line {number}: numbers before the first "
                                    "'Filter i:' line")
            try:
                blocks[-1][1].append([float(v) for v in line.split()])
            except ValueError:
                raise BankFileError(f"{path}: line {number}: not a row of numbers")
    if not blocks:
        raise BankFileError(f"{path}: no 'Filter i:' blocks (masterfiltmodel's bank format)")
    filters = []
    for head, rows in blocks:
        k = len(rows)
        if k < 2 or any(len(r) != k for r in rows):
            widths = sorted({len(r) for r in rows})
            raise BankFileError(f"{path}: {head!r} is {k} rows of {widths} numbers, not a square "
                                "k×k filter")
        filters.append(np.asarray(rows, np.float64))
    sizes = sorted({len(f) for f in filters})
    if len(sizes) > 1:
        raise BankFileError(f"{path}: filters of several sizes ({', '.join(map(str, sizes))})")
    bank = np.stack(filters)
    if not np.all(np.isfinite(bank)):
        i = int(np.flatnonzero(~np.isfinite(bank).reshape(len(bank), -1).all(axis=1))[0])
        raise BankFileError(f"{path}: {blocks[i][0]!r} has a non-finite value")
    return bank


def _number(v: float) -> str:
    # the shortest text that reads back to the same float32
    return np.format_float_positional(np.float32(v), unique=True, trim="-")


def bank_text(bank: np.ndarray) -> str:
    """`[K, k, k]` → the text format (`Filter 1:` …), float32 values written to round-trip."""
    out = []
    for i, f in enumerate(np.asarray(bank, np.float32), 1):
        out.append(f"Filter {i}:")
        out += [" ".join(_number(v) for v in row) for row in f]
        out.append("")
    return "\n".join(out) + "\n"


def save_bank(folder: str, bank: np.ndarray) -> None:
    """Writes `bank.npy` (float32 `[K, k, k]`) and `bank.txt`, each atomically."""
    bank = np.asarray(bank, np.float32)
    atomic.save_npy(bank_npy(folder), bank)
    with atomic.atomic_open(bank_txt(folder)) as f:
        f.write(bank_text(bank))


def read_bank(folder: str) -> np.ndarray | None:
    """`bank.npy` `[K, k, k]` float32, or None when there is none."""
    try:
        return np.load(bank_npy(folder))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- small tables
def write_table(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A CSV table, atomically; floats with 6 decimals, NaN empty."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else f"{float(v):.6f}"
        return v

    with atomic.atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[cell(v) for v in r] for r in rows])
    return path


def read_table(path: str) -> list[dict] | None:
    """A CSV table's rows as dicts of text, or None when the file does not exist."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- rows
@contextlib.contextmanager
def open_part(out_dir: str, part: assignment_files.Part, k: int, data_dir: str,
              num_filters: int) -> Iterator["PartWriter"]:
    """A `PartWriter` for one part under `out_dir` (`rows_dir`): its row file and statistics
    appear only when the block exits without an error; otherwise nothing of the part is left."""
    with atomic.atomic_path(assignment_files.rows_path(out_dir, part, k, FORMAT)) as tmp:
        with contextlib.ExitStack() as files:
            writer = PartWriter(tmp, files, part, k, data_dir, num_filters)
            yield writer
            writer.finish()
        # statistics first: the row file, renamed last, is the completion marker
        atomic.write_json(assignment_files.stats_path(out_dir, part, k), writer.stats())


class PartWriter:
    """Streams one part's rows to the temp file `tmp` and counts kernels per filter and layer."""

    def __init__(self, tmp: str, files: contextlib.ExitStack, part: assignment_files.Part,
                 k: int, data_dir: str, num_filters: int):
        self._tmp, self._files, self._parquet = tmp, files, None
        self.part, self.k, self.num_filters = part, k, num_filters
        self.data_dir = os.path.abspath(data_dir)
        self.layer_ids = np.unique(np.asarray(part.shard.meta["layer"][part.start:part.stop]))
        self.layer_names = [part.shard.layer_names.get(int(i), "") for i in self.layer_ids]
        self.counts = np.zeros((len(self.layer_ids), num_filters + 1), np.int64)  # last: dead
        self.r2_sum = np.zeros(len(self.layer_ids))
        self.rows = 0

    def write(self, filter_: np.ndarray, scale: np.ndarray, offset: np.ndarray,
              r2: np.ndarray) -> None:
        """The next rows of the part, in shard order, every column `[n]`."""
        import pyarrow.parquet as pq

        a, n = self.part.start + self.rows, len(filter_)
        meta = self.part.shard.meta[a:a + n]
        layer = np.asarray(meta["layer"], np.int32)
        channel = np.asarray(meta["channel"], np.int32)
        shards.release_pages(self.part.shard.meta, a, a + n)
        pos = np.searchsorted(self.layer_ids, layer)
        slot = np.where(filter_ < 0, self.num_filters, filter_).astype(np.int64)
        width = self.num_filters + 1
        self.counts += np.bincount(pos * width + slot, minlength=self.counts.size
                                   ).reshape(self.counts.shape)
        self.r2_sum += np.bincount(pos, weights=np.nan_to_num(r2), minlength=len(self.layer_ids))
        columns = [pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                                  pa.array([self.part.shard.source])),
                   pa.array(layer), pa.array(channel), pa.array(np.asarray(filter_, np.int32)),
                   *(pa.array(np.asarray(v, np.float32), from_pandas=False)
                     for v in (scale, offset, r2))]
        if self._parquet is None:
            self._parquet = self._files.enter_context(pq.ParquetWriter(
                self._tmp, ROW_SCHEMA, compression="zstd", use_dictionary=["source"]))
        self._parquet.write_table(pa.Table.from_arrays(columns, schema=ROW_SCHEMA))
        self.rows += n

    def finish(self) -> None:
        """Checks the part is complete; an empty part still gets a file with the schema."""
        if self.rows != self.part.stop - self.part.start:
            raise RuntimeError(f"{self.part}: wrote {self.rows} rows")
        if self._parquet is None:
            import pyarrow.parquet as pq

            pq.write_table(ROW_SCHEMA.empty_table(), self._tmp)

    def stats(self) -> dict:
        """The part's statistics, in `assignment_files.read_stats`' layout: `labels` counts
        kernels per filter (and dead ones), `clustered` counts the fitted (live) kernels, and
        `r2_sum` sums their explained fractions."""
        names = filter_names(self.num_filters)

        def counts(row: np.ndarray, r2_sum: float) -> dict:
            return {"kernels": int(row.sum()), "clustered": int(row[:-1].sum()),
                    "r2_sum": float(r2_sum),
                    "labels": {name: int(v) for name, v in zip(names, row) if v}}

        return assignment_files.part_statistics(
            self.part, self.data_dir, self.k, self.layer_ids, self.layer_names,
            counts(self.counts.sum(axis=0), self.r2_sum.sum()),
            [counts(self.counts[i], self.r2_sum[i]) for i in range(len(self.layer_ids))])


def write_summary(out_dir: str, summary: dict) -> dict:
    """`_meta/summary.json` of the rows in `out_dir`."""
    atomic.write_json(assignment_files.summary_path(out_dir), summary)
    return summary
