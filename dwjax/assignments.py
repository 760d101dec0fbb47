"""The assignment files under `<workdir>/assignments/`: per-shard CSV rows, their per-shard statistics
(what `report` reads, so it never re-parses millions of rows), the settings they were made with, and
the summary. Written by `assign`, read by `report`.

    settings.json             method, kernel size, threshold, … (changed settings need --overwrite)
    <shard dir>.k5x5.csv      one row per kernel, COLUMNS; the completion marker (written last)
    <shard dir>.k5x5.json     source, shard sha256 and data_dir, counts per label, per layer likewise
    summary.json              totals over every completed shard
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil

import numpy as np

from dwjax import atomic, shards
from dwjax.errors import UserError

COLUMNS = ("source", "layer", "layer_name", "channel", "kernel_size", "code", "dissimilarity",
           "clustered", "label")
UNCLUSTERED, DEAD = "Unclustered", "Dead"


class AssignmentsError(UserError):
    """Existing assignments conflict with this job (one-line message)."""


def _base(out_dir: str, shard_dir: str, k: int) -> str:
    return os.path.join(out_dir, f"{shard_dir}.k{k}x{k}")


def rows_path(out_dir: str, shard_dir: str, k: int) -> str:
    """The per-shard row file (the shard's completion marker)."""
    return _base(out_dir, shard_dir, k) + ".csv"


def stats_path(out_dir: str, shard_dir: str, k: int) -> str:
    return _base(out_dir, shard_dir, k) + ".json"


def settings_path(out_dir: str) -> str:
    return os.path.join(out_dir, "settings.json")


def summary_path(out_dir: str) -> str:
    return os.path.join(out_dir, "summary.json")


def is_done(out_dir: str, shard: shards.Shard, k: int) -> bool:
    """True when this shard's rows exist *for this content* (the kernel file's sha256): a source
    re-converted in place, or another data dir's shard of the same name, is assigned again."""
    if not os.path.exists(rows_path(out_dir, shard.dir, k)):
        return False
    try:
        with open(stats_path(out_dir, shard.dir, k)) as f:
            return json.load(f).get("shard_sha256") == shard.sha256
    except (OSError, ValueError):
        return False


def _fmt(x: float) -> str:
    return "" if x != x else format(x, ".6g")


def write_shard(out_dir: str, shard: shards.Shard, k: int, data_dir: str, code: np.ndarray, dis: np.ndarray,
                clustered: np.ndarray, label: np.ndarray, block: int = 100_000) -> dict:
    """Writes one shard's rows (`[n]` arrays) and statistics atomically; returns the statistics."""
    layer = np.asarray(shard.meta["layer"])
    channel = np.asarray(shard.meta["channel"])
    label = np.asarray(label).astype(str)
    rows = rows_path(out_dir, shard.dir, k)
    with atomic.atomic_path(rows) as tmp_rows:
        with open(tmp_rows, "w", newline="") as f:
            w = csv.writer(f)  # quotes ids and names with commas or quotes correctly
            w.writerow(COLUMNS)
            for a in range(0, len(label), block):  # never a whole million-row shard's text at once
                b = slice(a, a + block)
                n = len(label[b])
                w.writerows(zip([shard.source] * n, layer[b].tolist(),
                                [shard.layer_names.get(l, "") for l in layer[b].tolist()],
                                channel[b].tolist(),
                                [k] * n, map(_fmt, code[b].tolist()), map(_fmt, dis[b].tolist()),
                                clustered[b].astype(int).tolist(), label[b].tolist()))
        stats = {"source": shard.source, "shard_dir": shard.dir, "shard_sha256": shard.sha256,
                 "data_dir": os.path.abspath(data_dir), "kernel_size": k,
                 **_counts(label, clustered),
                 "layers": [{"layer": int(l), "layer_name": shard.layer_names.get(int(l), ""),
                             **_counts(label[layer == l], clustered[layer == l])}
                            for l in np.unique(layer)]}
        # statistics first: the rows file, renamed last, is the completion marker
        atomic.write_json(stats_path(out_dir, shard.dir, k), stats)
    return stats


def _counts(label: np.ndarray, clustered: np.ndarray) -> dict:
    names, n = np.unique(label, return_counts=True)
    return {"kernels": int(len(label)), "clustered": int(np.sum(clustered)),
            "labels": {str(a): int(b) for a, b in zip(names, n)}}


def check_settings(out_dir: str, settings: dict, overwrite: bool) -> None:
    """Refuses to mix rows made with other settings unless `overwrite` (which clears them)."""
    path = settings_path(out_dir)
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise AssignmentsError(f"{out_dir}: existing assignments were made with other settings "
                                   f"({', '.join(diff)}); pass --overwrite to redo them")
    if overwrite and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    atomic.write_json(path, settings, sort_keys=True)


def read_stats(out_dir: str, kernel_size: int | None = None) -> list[dict]:
    """Statistics of every completed shard (sorted by file name)."""
    out = []
    for p in sorted(glob.glob(os.path.join(out_dir, "*.k*x*.json"))):
        if os.path.exists(p[:-len(".json")] + ".csv"):
            with open(p) as f:
                stats = json.load(f)
            if kernel_size is None or stats.get("kernel_size") == kernel_size:
                out.append(stats)
    return out


def write_summary(out_dir: str, k: int) -> dict:
    per_source = [{key: s[key] for key in ("source", "kernels", "clustered", "labels")}
                  for s in read_stats(out_dir, k)]
    total = sum(s["kernels"] for s in per_source)
    clustered = sum(s["clustered"] for s in per_source)
    summary = {"kernel_size": k, "kernels": total, "clustered": clustered,
               "clustered_fraction": clustered / max(1, total), "sources": per_source}
    atomic.write_json(summary_path(out_dir), summary)
    return summary


def clustered_labels(counts: dict) -> dict:
    """A `labels` count dict without the unclustered and dead kernels."""
    return {c: n for c, n in counts.items() if c not in (UNCLUSTERED, DEAD)}
