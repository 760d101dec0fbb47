"""Stage 5: per-model and per-layer proportions, as tables and figures.
`python -m dwjax.report --workdir=…`

Reads `<workdir>/assignments/*.csv` and writes `<workdir>/report/`: `by_source.csv` (kernels,
clustered fraction and each label's share per source), `by_layer.csv` (the same per source and layer),
and one stacked-bar figure per source (paper Figs. 7/8: class shares among clustered kernels per
layer) plus one across sources (Fig. 11).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np
from absl import app, flags

from dwjax import figures, paths
from dwjax.assign import DEAD, UNCLUSTERED


def read_assignments(workdir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(workdir, "assignments", "*.csv")))
    if not files:
        raise ValueError(f"--workdir {workdir}: no assignments (run `python -m dwjax.assign` first)")
    rows = []
    for p in files:
        with open(p, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def proportions(rows: list[dict], key) -> tuple[list, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Groups rows by `key(row)`; returns (groups, classes, counts [G, C], totals [G], clustered [G]).

    Classes are the labels of clustered kernels ("Others" included), most frequent first.
    """
    counts: dict = defaultdict(lambda: defaultdict(int))
    totals: dict = defaultdict(int)
    clustered: dict = defaultdict(int)
    for r in rows:
        g = key(r)
        totals[g] += 1
        if r["clustered"] == "1":
            clustered[g] += 1
            counts[g][r["label"]] += 1
    groups = list(totals)
    overall: dict = defaultdict(int)
    for g in groups:
        for c, n in counts[g].items():
            overall[c] += n
    classes = sorted((c for c in overall if c not in (UNCLUSTERED, DEAD)), key=lambda c: -overall[c])
    mat = np.array([[counts[g].get(c, 0) for c in classes] for g in groups], float).reshape(len(groups), len(classes))
    return groups, classes, mat, np.array([totals[g] for g in groups]), np.array([clustered[g] for g in groups])


def _write_table(path: str, header: list[str], rows: list[list]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def run_report(workdir: str, log=print) -> dict:
    rows = read_assignments(workdir)
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    srcs, classes, mat, tot, clu = proportions(rows, lambda r: r["source"])
    share = mat / np.maximum(clu, 1)[:, None]
    _write_table(os.path.join(out, "by_source.csv"), ["source", "kernels", "clustered_fraction", *classes],
                 [[s, int(t), f"{c / t:.4f}", *(f"{x:.4f}" for x in sh)] for s, t, c, sh in zip(srcs, tot, clu, share)])
    figs = [figures.plot_proportions(srcs, classes, share, os.path.join(out, "by_source.png"),
                                     "class shares among clustered kernels", xlabel="source")]
    layer_rows = []
    for src in srcs:
        sub = [r for r in rows if r["source"] == src]
        layers, lcls, lmat, ltot, lclu = proportions(sub, lambda r: (int(r["layer"]), r["layer_name"]))
        order = np.argsort([l[0] for l in layers])
        layers, lmat, ltot, lclu = [layers[i] for i in order], lmat[order], ltot[order], lclu[order]
        lshare = lmat / np.maximum(lclu, 1)[:, None]
        for (li, name), t, c, sh in zip(layers, ltot, lclu, lshare):
            layer_rows.append([src, li, name, int(t), f"{c / t:.4f}"] + [f"{dict(zip(lcls, sh)).get(x, 0):.4f}" for x in classes])
        figs.append(figures.plot_proportions([str(l[0]) for l in layers], lcls, lshare,
                                             os.path.join(out, f"layers_{_safe(src)}.png"),
                                             f"{src}: class shares among clustered kernels per depthwise layer"))
    for src in srcs:
        fig = _samples_figure(workdir, rows, src, out)
        if fig:
            figs.append(fig)
    _write_table(os.path.join(out, "by_layer.csv"),
                 ["source", "layer", "layer_name", "kernels", "clustered_fraction", *classes], layer_rows)
    width = max(len(s) for s in srcs)
    log(f"{'source'.ljust(width)}  kernels  clustered  top classes")
    for s, t, c, sh in zip(srcs, tot, clu, share):
        top = ", ".join(f"{classes[j]} {sh[j]:.0%}" for j in np.argsort(-sh)[:3] if sh[j] > 0)
        log(f"{s.ljust(width)}  {t:>7,}  {c / t:>8.1%}  {top}")
    log(f"tables and {len(figs)} figures in {out}")
    return {"dir": out, "figures": figs}


def _samples_figure(workdir: str, rows: list[dict], source: str, out: str, per_class: int = 8,
                    seed: int = 0) -> str | None:
    """Random clustered kernels of each class of one source (paper Figs. 5, 6), read back from the
    shards the assignment came from; skipped if those shards are gone."""
    meta = None
    for p in glob.glob(os.path.join(workdir, "assignments", "*.json")):
        with open(p) as f:
            m = json.load(f)
        if m.get("source") == source and "data_dir" in m:
            meta = m
    if meta is None:
        return None
    k = int(next(r["kernel_size"] for r in rows if r["source"] == source))
    path = os.path.join(meta["data_dir"], meta["shard_dir"], f"k{k}x{k}.npy")
    if not os.path.exists(path):
        return None
    kernels = np.load(path, mmap_mode="r")
    src_rows = [r for r in rows if r["source"] == source]  # same order as the shard
    if len(src_rows) != len(kernels):
        return None
    by_class = defaultdict(list)
    for i, r in enumerate(src_rows):
        if r["clustered"] == "1":
            by_class[r["label"]].append(i)
    rng = np.random.default_rng(seed)
    groups = {}
    for c in sorted(by_class, key=lambda c: -len(by_class[c])):
        pick = np.sort(rng.choice(by_class[c], min(per_class, len(by_class[c])), replace=False))
        groups[f"{c} ({len(by_class[c]):,})"] = np.asarray(kernels[pick])
    if not groups:
        return None
    return figures.plot_gallery(groups, os.path.join(out, f"samples_{_safe(source)}.png"),
                                f"{source}: random clustered kernels per class (count)")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text)


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory with assignments (default $DWJAX_HOME/runs/k<kernel_size>).")
    flags.DEFINE_integer("kernel_size", 5, "Picks the default workdir when --workdir is not given.")


def main(argv):
    del argv
    try:
        run_report(FLAGS.workdir or paths.default_workdir(FLAGS.kernel_size))
    except ValueError as e:
        sys.exit(f"report: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
