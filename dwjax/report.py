"""Stage 5: per-model and per-layer proportions, as tables and figures.
`python -m dwjax.report --workdir=…`

Reads the per-shard statistics `assign` wrote beside its rows (never re-parsing millions of rows) and
writes `<workdir>/report/`:

- `by_source.csv`: kernels, clustered fraction and each class's share of the clustered kernels;
- `by_layer.csv`: the same per source and depthwise layer;
- `by_source.png`, `layers_<source>.png`: stacked bars of class shares (paper Figs. 7, 8, 11; the four
  first-derivative subtypes merged into one bar, as Fig. 7 does);
- `samples_<source>.png`: random clustered kernels of each class (Figs. 5, 6), read back from the shards.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Callable

import numpy as np
from absl import app, flags

from dwjax import assignments, atomic, cli, figures, paths, shards, templates
from dwjax import workdir as workdir_lib
from dwjax.errors import RunDirError


def _share_table(groups: list[dict]) -> tuple[list[str], np.ndarray]:
    """Classes (most frequent first) and `[G, C]` shares of each group's clustered kernels."""
    total: dict = defaultdict(int)
    for g in groups:
        for c, n in assignments.clustered_labels(g["labels"]).items():
            total[c] += n
    classes = sorted(total, key=lambda c: (-total[c], c))
    counts = np.array([[g["labels"].get(c, 0) for c in classes] for g in groups], float).reshape(len(groups), -1)
    return classes, counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def _merged(classes: list[str], shares: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Folds the first-derivative subtypes into one class (paper Fig. 7)."""
    merged = list(dict.fromkeys(templates.merged_class(c) for c in classes))
    out = np.zeros((len(shares), len(merged)))
    for j, c in enumerate(classes):
        out[:, merged.index(templates.merged_class(c))] += shares[:, j]
    return merged, out


def _write_table(path: str, header: list[str], rows: list[list]) -> None:
    with atomic.atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _samples_figure(run: workdir_lib.RunDir, stats: dict, per_class: int = 8,
                    seed: int = 0) -> str | None:
    """Random clustered kernels of each class of one shard, read back from its kernel file (skipped
    when the shards are gone or were re-converted since)."""
    k = stats["kernel_size"]
    path = shards.kernel_file(stats["data_dir"], stats["shard_dir"], k)
    if not os.path.exists(path) or shards.sha256_file(path) != stats["shard_sha256"]:
        return None
    rows = assignments.read_rows(run.assignments, stats, ("clustered", "label"))
    by_class = defaultdict(list)
    for i in np.flatnonzero(rows["clustered"]):  # rows are in shard order
        by_class[rows["label"][i]].append(i)
    if not by_class:
        return None
    kernels = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    groups = {}
    for c in sorted(by_class, key=lambda c: -len(by_class[c])):
        pick = rng.choice(by_class[c], min(per_class, len(by_class[c])), replace=False)
        groups[f"{c} ({len(by_class[c]):,})"] = np.asarray(kernels[np.sort(pick)])
    out = os.path.join(run.report, f"samples_{shards.slugify(stats['source'])}.png")
    return figures.plot_gallery(groups, out,
                                f"{stats['source']}: random clustered kernels per class (count)")


def run_report(workdir: str, log: Callable[[str], None] = print) -> dict:
    """Writes the tables and figures; returns `{"dir", "figures"}`."""
    run = workdir_lib.RunDir(workdir)
    stats = assignments.read_stats(run.assignments)
    if not stats:
        raise RunDirError(f"--workdir {workdir}: no assignments (run `python -m dwjax.assign` "
                          "first)")
    out = run.report
    os.makedirs(out, exist_ok=True)
    srcs = [s["source"] for s in stats]
    classes, shares = _share_table(stats)
    frac = [s["clustered"] / max(1, s["kernels"]) for s in stats]
    _write_table(os.path.join(out, "by_source.csv"), ["source", "kernels", "clustered_fraction", *classes],
                 [[s["source"], s["kernels"], f"{f:.4f}", *(f"{x:.4f}" for x in sh)]
                  for s, f, sh in zip(stats, frac, shares)])
    figs = [figures.plot_proportions(srcs, *_merged(classes, shares), os.path.join(out, "by_source.png"),
                                     "class shares among clustered kernels", xlabel="source")]
    layer_rows = []
    for s in stats:
        layers = sorted(s["layers"], key=lambda l: l["layer"])
        lcls, lshare = _share_table(layers)
        full = {c: j for j, c in enumerate(lcls)}
        for l, sh in zip(layers, lshare):
            layer_rows.append([s["source"], l["layer"], l["layer_name"], l["kernels"],
                               f"{l['clustered'] / max(1, l['kernels']):.4f}",
                               *(f"{sh[full[c]]:.4f}" if c in full else "0.0000" for c in classes)])
        figs.append(figures.plot_proportions([str(l["layer"]) for l in layers], *_merged(lcls, lshare),
                                             os.path.join(out, f"layers_{shards.slugify(s['source'])}.png"),
                                             f"{s['source']}: class shares among clustered kernels per depthwise layer"))
        sample = _samples_figure(run, s)
        if sample:
            figs.append(sample)
    _write_table(os.path.join(out, "by_layer.csv"),
                 ["source", "layer", "layer_name", "kernels", "clustered_fraction", *classes], layer_rows)
    width = max(len(x) for x in srcs + ["source"])
    log(f"{'source'.ljust(width)}  kernels  clustered  top classes")
    for s, f, sh in zip(stats, frac, shares):
        top = ", ".join(f"{classes[j]} {sh[j]:.0%}" for j in np.argsort(-sh)[:3] if sh[j] > 0)
        log(f"{s['source'].ljust(width)}  {s['kernels']:>7,}  {f:>8.1%}  {top}")
    log(f"tables and {len(figs)} figures in {out}")
    return {"dir": out, "figures": figs}


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None,
                        "Run directory with assignments (default $DWJAX_HOME/runs/k<kernel_size>).")
    flags.DEFINE_integer("kernel_size", 5, "Picks the default workdir when --workdir is not given.")


def main(argv):
    del argv
    cli.setup(uses_jax=False)
    with cli.user_errors("report"):
        run_report(FLAGS.workdir or paths.default_workdir(FLAGS.kernel_size))


if __name__ == "__main__":
    define_flags()
    app.run(main)
