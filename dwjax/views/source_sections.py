"""Report parts that compare sources or describe them (library module): two or more sources layer
by layer (`--compare`, Figs. 18, 26), checkpoints of one training run (`--timeline`, Figs. 24,
25), the 3×3 k-means centroids (appendix N) and the per-model table (Tables 3, 4).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dwjax.io import shards, sources, weight_files
from dwjax.search import kmeans
from dwjax.views import charts as rfig
from dwjax.views import tables
from dwjax.views.sections import Context, Entry, ReportError, _f, write_csv


def compare(ctx: Context, names: Sequence[str]) -> list[Entry]:
    """Per-layer shares of two or more sources on one figure, `compare_<a>_vs_<b>.csv`."""
    if len(names) < 2:
        raise ReportError(f"--compare {','.join(names)}: name two or more sources")
    picked = [ctx.source(n) for n in names]
    classes = tables.run_classes(picked)
    panels, rows = {}, []
    for s in picked:
        sh = tables.shares_of_all(s["layers"], classes)
        fr = tables.clustered_fraction(s["layers"])
        panels[s["source"]] = ([str(i) for i in range(len(s["layers"]))],
                               tables.merged(classes, sh)[1])
        rows += [[s["source"], i, _f(f), *map(_f, row)] for i, (f, row) in enumerate(zip(fr, sh))]
    stem = "compare_" + "_vs_".join(shards.slugify(n) for n in names)
    write_csv(ctx.path(stem + ".csv"), ["source", "layer", "clustered_fraction", *classes], rows)
    figs = rfig.plot_compare(panels, tables.merged(classes, np.zeros((0, len(classes))))[0],
                             ctx.path(stem), "layer by layer: " + " vs ".join(names),
                             formats=ctx.formats)
    return [Entry(f"Comparison: {' vs '.join(names)} (paper Figs. 18, 26)",
                  "The per-layer bars of each source stacked one above the other on one scale "
                  "(shares of all kernels of the layer; grey = unclustered), e.g. two seeds of "
                  "one model (Fig. 18) or one model trained on different data (Fig. 26).",
                  figs[:1], [ctx.path(stem + ".csv")])]


def timeline(ctx: Context, names: Sequence[str]) -> list[Entry]:
    """Class shares and the clustered fraction per checkpoint, in the order given
    (`timeline.csv`)."""
    if len(names) < 2:
        raise ReportError(f"--timeline {','.join(names)}: name two or more checkpoint sources")
    picked = [ctx.source(n) for n in names]
    classes = tables.run_classes(picked)
    sh = tables.shares_of_all(picked, classes)
    fr = tables.clustered_fraction(picked)
    write_csv(ctx.path("timeline.csv"), ["source", "kernels", "clustered_fraction", *classes],
              [[s["source"], s["kernels"], _f(f), *map(_f, row)]
               for s, f, row in zip(picked, fr, sh)])
    figs = rfig.plot_timeline(list(names), *tables.merged(classes, sh), fr, ctx.path("timeline"),
                              "timeline: checkpoints of one training run", formats=ctx.formats)
    return [Entry("Timeline over checkpoints (paper Figs. 24, 25)",
                  "Each checkpoint named with --timeline, in that order: its class shares of all "
                  "kernels (left, Fig. 24) and its clustered fraction (right, Fig. 25).",
                  figs[:1], [ctx.path("timeline.csv")])]


def centroids(ctx: Context) -> list[Entry]:
    """The 3×3 path's k-means centroids with their names (appendix N), when the run has them."""
    import os

    path = ctx.run.kmeans_npz(ctx.kernel_size)
    if not os.path.exists(path):
        return []
    with np.load(path) as z:
        cents, names = z["centroids"], [str(n) for n in z["names"]]
        threshold = float(z["threshold"]) if "threshold" in z else None
    k = int(round(np.sqrt(cents.shape[1])))
    figs = rfig.plot_centroids(cents.reshape(-1, k, k), names, ctx.path("kmeans_centroids"),
                               f"{k}×{k} k-means centroids (min-max space, drawn centred)",
                               formats=ctx.formats)
    return [Entry(f"{k}×{k} k-means centroids (paper appendix N)",
                  "The centroids the 3×3 path fitted (k-means++ then Lloyd on min-max encoded "
                  "kernels), largest cluster first, each named after the nearest DoG-family "
                  "template when the match is convincing. " + _clustered_3x3(threshold),
                  figs[:1])]


def _clustered_3x3(threshold: float | None) -> str:
    """What "clustered" means on the 3×3 path: the report says it with the run's number."""
    if threshold is None:
        return ("These centroids predate the calibrated threshold: every live kernel was counted "
                "as clustered, which says nothing (k-means always has a nearest centroid).")
    return (f"A kernel counts as clustered when its min-max distance to the nearest centroid is "
            f"below {threshold:.4f}: the distance that only "
            f"{100 * kmeans.RANDOM_CLUSTERED_SHARE:g} % of uniform- or normal-random "
            "kernels (how frameworks initialise convolutions) reach for these centroids, so a "
            "random-init model comes out about that clustered.")


def models(ctx: Context) -> list[Entry]:
    """`models.csv`: Tables 3/4's columns next to the clustered share."""
    rows, sizes = [], set()
    for s in ctx.stats:
        info = shards.read_source_json(s["data_dir"], s["shard_dir"]) or {}
        params = None
        path = sources.origin_file(info.get("origin", {}))
        if path:
            try:
                params = tables.count_parameters(weight_files.open_checkpoint(path))
            except weight_files.CheckpointError:
                params = None
        summary = tables.model_summary(info, params)
        sizes |= set(summary["sizes"])
        rows.append((s, summary, info.get("origin", {})))
    sizes = sorted(sizes, key=lambda z: int(z.split("x")[0]))
    header = ["source", "origin", "parameters", "depthwise_layers",
              *(f"{z}_{what}" for z in sizes for what in ("layers", "kernels")),
              "kernels_assigned", "clustered_fraction"]
    out = []
    for s, summary, origin in rows:
        per = [summary["sizes"].get(z, {}).get(what, 0) for z in sizes
               for what in ("layers", "kernels")]
        out.append([s["source"], origin.get("architecture") or origin.get("model")
                    or origin.get("kind", ""), summary["parameters"] or "",
                    summary["depthwise_layers"], *per, s["kernels"],
                    _f(s["clustered"] / max(1, s["kernels"]))])
    write_csv(ctx.path("models.csv"), header, out)
    return [Entry("Per model (paper Tables 1, 3, 4)",
                  "Parameters counted from the weights file's tensor shapes without loading "
                  "them or building a model (BatchNorm running statistics left out; blank when "
                  "the file is not on this machine, e.g. a timm download), depthwise layers and "
                  "kernels per size from the shards, and the share of this run's kernels "
                  f"clustered at threshold {ctx.settings.get('threshold', '')}.",
                  tables=[ctx.path("models.csv")])]


