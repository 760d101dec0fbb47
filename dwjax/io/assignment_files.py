"""The assignment files under `<workdir>/assignments/`: per-part rows, their statistics (what
`report` reads, so it never re-parses millions of rows), the settings they were made with, and the
summary. Written by `assign`, read by `report`.

    <shard dir>.k5x5.parquet                   one part covering a whole shard: its rows
                                               (dwjax.io.assignment_rows.ROW_SCHEMA)
    <shard dir>.k5x5.r<start>-<stop>.parquet   one row range of a shard larger than a part
    _meta/settings.json                        the assign config the rows were made with (all but
                                               its `job` section) and the digests of the labels
                                               and decoded codes or centroids; changes need
                                               --config.job.overwrite
    _meta/<row file stem>.json                 the part's statistics: source, shard sha256,
                                               data_dir, row range, counts per label and per layer
    _meta/summary.json                         totals over every completed shard

The row file is the part's completion marker: it is renamed into place after its statistics, so a
part is done when both exist and the statistics name the same shard content and row range. Only
row files and hidden or `_`-prefixed names live at the top, so `pd.read_parquet(<assignments>)`
reads a whole job. `--config.format=csv` writes `.csv` row files with the same columns.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import json
import os
import shutil
from typing import Iterator, Sequence

import numpy as np

from dwjax.errors import UserError
from dwjax.io import assignment_rows, atomic, locks, shards

UNCLUSTERED, DEAD = assignment_rows.UNCLUSTERED, assignment_rows.DEAD
FORMATS = ("parquet", "csv")
META = "_meta"


class AssignmentsError(UserError):
    """Existing assignments conflict with this job (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows `[start, stop)` of one shard: the unit of work, of a row file and of its statistics."""
    shard: shards.Shard
    start: int
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == len(self.shard.kernels)

    def stem(self, k: int) -> str:
        base = f"{self.shard.dir}.k{k}x{k}"
        return base if self.whole else f"{base}.r{self.start}-{self.stop}"


def plan_parts(shard_list: Sequence[shards.Shard], part_size: int) -> list[Part]:
    """Every shard in order, cut into row ranges of at most `part_size` rows (deterministic)."""
    parts = []
    for s in shard_list:
        n = len(s.kernels)
        parts += [Part(s, a, min(a + part_size, n)) for a in range(0, max(n, 1), part_size)]
    return parts


def rows_path(out_dir: str, part: Part, k: int, fmt: str) -> str:
    return os.path.join(out_dir, f"{part.stem(k)}.{fmt}")


def stats_path(out_dir: str, part: Part, k: int) -> str:
    return os.path.join(out_dir, META, f"{part.stem(k)}.json")


def settings_path(out_dir: str) -> str:
    return os.path.join(out_dir, META, "settings.json")


def summary_path(out_dir: str) -> str:
    return os.path.join(out_dir, META, "summary.json")


def is_done(out_dir: str, part: Part, k: int, fmt: str) -> bool:
    """True when this part's rows exist *for this content* (the kernel file's sha256): a source
    re-converted in place, or another data dir's shard of the same name, is assigned again."""
    if not os.path.exists(rows_path(out_dir, part, k, fmt)):
        return False
    try:
        with open(stats_path(out_dir, part, k)) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return False
    return (stats.get("shard_sha256"), stats.get("start"), stats.get("stop")) == (
        part.shard.sha256, part.start, part.stop)


def distinct_ids(ids: np.ndarray) -> np.ndarray:
    """The sorted distinct values of non-negative integer ids `[n]`, in O(n + max − min) (layer
    ids are a shard's few layer numbers; `np.unique` would sort every row)."""
    if len(ids) == 0:
        return ids[:0]
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo > len(ids):
        return np.unique(ids)
    return (np.flatnonzero(np.bincount(ids - lo)) + lo).astype(ids.dtype)


# ----------------------------------------------------------------------------- writing a part
@contextlib.contextmanager
def open_part(out_dir: str, part: Part, k: int, fmt: str, data_dir: str,
              label_names: Sequence[str], search: dict | None = None) -> Iterator["PartWriter"]:
    """A `PartWriter` for one part: its row file and statistics appear only when the block exits
    without an error; otherwise nothing of the part is left."""
    with atomic.atomic_path(rows_path(out_dir, part, k, fmt)) as tmp:
        with contextlib.ExitStack() as files:
            writer = PartWriter(tmp, files, part, k, fmt, data_dir, label_names)
            yield writer
            writer.finish()
        # statistics first: the row file, renamed last, is the completion marker
        atomic.write_json(stats_path(out_dir, part, k), {**writer.stats(), "search": search})


class PartWriter:
    """Streams one part's rows to the temp file `tmp` block by block and keeps its statistics
    (`open_part` makes one). `label_names` is the dictionary every block's `label_index` points
    into; `files` closes what the writer opens."""

    def __init__(self, tmp: str, files: contextlib.ExitStack, part: Part, k: int, fmt: str,
                 data_dir: str, label_names: Sequence[str]):
        self._tmp, self._files = tmp, files
        self.part, self.k, self.fmt = part, k, fmt
        self.data_dir = os.path.abspath(data_dir)
        self.label_names = list(label_names)
        meta = part.shard.meta
        layer_ids = distinct_ids(np.asarray(meta["layer"][part.start:part.stop]))
        shards.release_pages(meta, part.start, part.stop)  # read again block by block
        self.layer_ids = layer_ids
        self.layer_names = [part.shard.layer_names.get(int(lid), "") for lid in layer_ids]
        self.counts = np.zeros((len(layer_ids), len(self.label_names)), np.int64)
        self.clustered = np.zeros(len(layer_ids), np.int64)
        self.rows = 0  # written so far
        self._parquet = None
        self._csv = None

    def write(self, pieces: Sequence[assignment_rows.Rows]) -> None:
        """The next rows of the part, in shard order, as consecutive pieces: one block, written
        as one Parquet row group without joining the pieces first."""
        self._write([self._account(rows) for rows in pieces])

    def _account(self, rows: assignment_rows.Rows) -> tuple:
        """`(where, rows)` of the next rows, counted into the part's statistics."""
        a = self.part.start + self.rows
        n = len(rows.code)
        meta = self.part.shard.meta[a:a + n]
        # copies (np.asarray of an int32 field would be a view): the rows are built after the
        # pages are released, and reading a view would map them again
        layer = np.array(meta["layer"], np.int32)
        channel = np.array(meta["channel"], np.int32)
        shards.release_pages(self.part.shard.meta, a, a + n)  # as the search does kernel pages
        layer_pos = np.searchsorted(self.layer_ids, layer).astype(np.int32)
        rows = rows.typed()
        width = len(self.label_names)
        self.counts += np.bincount(layer_pos.astype(np.int64) * width + rows.label_index,
                                   minlength=self.counts.size).reshape(self.counts.shape)
        self.clustered += np.bincount(layer_pos, weights=rows.clustered,
                                      minlength=len(self.layer_ids)).astype(np.int64)
        self.rows += n
        return assignment_rows.Where(self.part.shard.source, self.k, layer, layer_pos,
                                     self.layer_names, channel), rows

    def _write(self, blocks: Sequence[tuple]) -> None:
        """`blocks`: `(where, rows)` pairs, written in order as one row group (Parquet)."""
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            if self._parquet is None:
                self._parquet = self._files.enter_context(pq.ParquetWriter(
                    self._tmp, assignment_rows.ROW_SCHEMA,
                    compression=assignment_rows.COMPRESSION,
                    column_encoding=assignment_rows.ENCODINGS,
                    use_dictionary=assignment_rows.DICTIONARY_COLUMNS,
                    write_statistics=assignment_rows.STATISTICS_COLUMNS))
            self._parquet.write_table(pa.concat_tables(
                [assignment_rows.table(where, rows, self.label_names) for where, rows in blocks]))
        else:
            if self._csv is None:
                f = self._files.enter_context(open(self._tmp, "w", newline=""))
                self._csv = csv.writer(f)  # quotes ids and names with commas or quotes
                self._csv.writerow(assignment_rows.COLUMNS)
            for where, rows in blocks:
                self._csv.writerows(assignment_rows.text_rows(where, rows, self.label_names))

    def finish(self) -> None:
        """Checks the part is complete; an empty part still gets a header-only file."""
        if self.rows != self.part.stop - self.part.start:
            raise RuntimeError(f"{self.part}: wrote {self.rows} rows")
        if self._parquet is None and self._csv is None:
            empty = np.zeros(0, np.int32)
            where = assignment_rows.Where(self.part.shard.source, self.k, empty, empty,
                                          self.layer_names, empty)
            self._write([(where, assignment_rows.Rows.empty())])

    def stats(self) -> dict:
        def counts(row: np.ndarray, clustered: int) -> dict:
            return {"kernels": int(row.sum()), "clustered": int(clustered),
                    "labels": {name: int(n) for name, n in zip(self.label_names, row) if n}}

        return part_statistics(self.part, self.data_dir, self.k, self.layer_ids, self.layer_names,
                               counts(self.counts.sum(axis=0), self.clustered.sum()),
                               [counts(self.counts[i], self.clustered[i])
                                for i in range(len(self.layer_ids))])


def part_statistics(part: Part, data_dir: str, k: int, layer_ids, layer_names: Sequence[str],
                    total: dict, per_layer: Sequence[dict]) -> dict:
    """A part's statistics file: where its rows come from, `total` counts and one `per_layer`
    dict of counts per layer (what `read_stats` merges and `report` reads)."""
    s = part.shard
    return {"source": s.source, "shard_dir": s.dir, "shard_sha256": s.sha256,
            "data_dir": data_dir, "kernel_size": k, "start": part.start, "stop": part.stop,
            "shard_rows": len(s.kernels), **total,
            "layers": [{"layer": int(lid), "layer_name": name, **counts}
                       for lid, name, counts in zip(layer_ids, layer_names, per_layer)]}


# ----------------------------------------------------------------------------- settings, summary
def check_settings(out_dir: str, settings: dict, overwrite: bool, search: dict | None = None,
                   allow_mixed: bool = False) -> None:
    """Refuses to mix rows made with other settings unless `overwrite` (which clears them), and
    rows searched another way (`search`: backend, method, tiles, jax version) unless
    `allow_mixed`: near-ties may round differently there.

    Check and write happen under one lock, so two jobs started together agree on what is there.
    """
    with locks.exclusive(os.path.join(os.path.dirname(out_dir), ".assign.lock"),
                         "an assignment settings check"):
        _check_settings(out_dir, {**settings, "search": search}, overwrite, allow_mixed)


def _describe(search: dict | None) -> str:
    if not search:
        return "an unrecorded search"
    return ", ".join(f"{k} {v}" for k, v in search.items())


def _check_settings(out_dir: str, settings: dict, overwrite: bool, allow_mixed: bool) -> None:
    path = settings_path(out_dir)
    if os.path.exists(path) and not overwrite:
        old = _read_json(path)
        rows_old = {k: v for k, v in old.items() if k != "search"}
        rows_new = {k: v for k, v in settings.items() if k != "search"}
        if rows_old != rows_new:
            diff = sorted(k for k in set(rows_old) | set(rows_new)
                          if rows_old.get(k) != rows_new.get(k))
            raise AssignmentsError(f"{out_dir}: existing assignments were made with other "
                                   f"settings ({', '.join(diff)}); pass "
                                   "--config.job.overwrite=true to redo them")
        if old.get("search") != settings["search"] and not allow_mixed:
            raise AssignmentsError(
                f"{out_dir}: the job's rows were searched with {_describe(old.get('search'))}; "
                f"this worker would use {_describe(settings['search'])} (near-ties may round "
                "differently); run it where the job started, or pass "
                "--config.job.allow_mixed=true (each part then records its own search)")
    if overwrite and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if not os.path.exists(path) or overwrite:
        atomic.write_json(path, settings, sort_keys=True)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise AssignmentsError(f"{path}: corrupt statistics ({e}); delete it and assign again")


def _merge(parts: list[dict]) -> dict:
    """One shard's statistics from its parts' (summing counts; layers merged by id)."""
    first = parts[0]
    out = {key: first[key] for key in ("source", "shard_dir", "shard_sha256", "data_dir",
                                       "kernel_size")}
    out["kernels"] = sum(p["kernels"] for p in parts)
    out["clustered"] = sum(p["clustered"] for p in parts)
    out["labels"] = _sum_labels(p["labels"] for p in parts)
    layers: dict[int, dict] = {}
    for p in parts:
        for layer in p["layers"]:
            d = layers.setdefault(layer["layer"], {"layer": layer["layer"],
                                                   "layer_name": layer["layer_name"],
                                                   "kernels": 0, "clustered": 0, "labels": {}})
            d["kernels"] += layer["kernels"]
            d["clustered"] += layer["clustered"]
            d["labels"] = _sum_labels([d["labels"], layer["labels"]])
    out["layers"] = [layers[lid] for lid in sorted(layers)]
    out["parts"] = [p["stem"] for p in parts]  # row-file stems in row order
    return out


def _sum_labels(dicts) -> dict:
    total: dict[str, int] = {}
    for d in dicts:
        for name, n in d.items():
            total[name] = total.get(name, 0) + n
    return dict(sorted(total.items()))


def read_stats(out_dir: str, kernel_size: int | None = None) -> list[dict]:
    """Statistics of every completed shard (all its parts done), sorted by row-file name."""
    by_shard: dict[tuple, list[dict]] = {}
    for p in sorted(glob.glob(os.path.join(out_dir, META, "*.k*x*.json"))):
        stem = os.path.basename(p)[:-len(".json")]
        if not any(os.path.exists(os.path.join(out_dir, f"{stem}.{fmt}")) for fmt in FORMATS):
            continue
        stats = dict(_read_json(p), stem=stem)
        if kernel_size is None or stats.get("kernel_size") == kernel_size:
            by_shard.setdefault((stats["shard_dir"], stats["kernel_size"]), []).append(stats)
    out = []
    for parts in by_shard.values():
        parts.sort(key=lambda s: s["start"])
        covered = sum(s["stop"] - s["start"] for s in parts)
        if covered == parts[0]["shard_rows"] and len({s["shard_sha256"] for s in parts}) == 1:
            out.append(_merge(parts))
    return out


def remove_stale(out_dir: str, plan: Sequence[Part], k: int) -> None:
    """Removes row files and statistics of the planned shards that the plan does not contain
    (another part size, or a shard re-converted with other rows), so no row is counted twice."""
    keep = {p.stem(k) for p in plan}
    for shard_dir in {p.shard.dir for p in plan}:
        prefix = f"{shard_dir}.k{k}x{k}"
        for path in glob.glob(os.path.join(glob.escape(out_dir), glob.escape(prefix) + ".*")):
            stem = os.path.basename(path).rsplit(".", 1)[0]
            if stem != prefix and not stem[len(prefix):].startswith(".r"):
                continue  # another shard whose name extends this one
            if stem not in keep:
                os.remove(path)
                stats = os.path.join(out_dir, META, stem + ".json")
                if os.path.exists(stats):
                    os.remove(stats)


def write_summary(out_dir: str, k: int) -> dict:
    per_source = [{key: s[key] for key in ("source", "kernels", "clustered", "labels")}
                  for s in read_stats(out_dir, k)]
    total = sum(s["kernels"] for s in per_source)
    clustered = sum(s["clustered"] for s in per_source)
    summary = {"kernel_size": k, "kernels": total, "clustered": clustered,
               "clustered_fraction": clustered / max(1, total), "sources": per_source}
    atomic.write_json(summary_path(out_dir), summary)
    return summary


def read_rows(out_dir: str, stats: dict, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns `{name: [n]}` of one shard's rows in shard order, read from its parts' row files
    (`stats` from `read_stats`); text columns come back as object arrays."""
    chunks = []
    for stem in stats["parts"]:
        base = os.path.join(out_dir, stem)
        if os.path.exists(base + ".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(base + ".parquet", columns=list(columns))
            chunks.append(assignment_rows.from_arrow(table, columns))
        else:
            with open(base + ".csv", newline="") as f:
                rows = list(csv.DictReader(f))
            chunks.append({c: assignment_rows.from_text(c, [r[c] for r in rows])
                           for c in columns})
    return {c: np.concatenate([ch[c] for ch in chunks]) for c in columns}


def clustered_labels(counts: dict) -> dict:
    """A `labels` count dict without the unclustered and dead kernels."""
    return {c: n for c, n in counts.items() if c not in (UNCLUSTERED, DEAD)}
