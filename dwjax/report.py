"""Stage 5: every table and figure of the paper for one run, gathered on one page.
`python -m dwjax.report --workdir=…`

Reads the per-shard statistics and rows `assign` wrote (and the shards, when they are still there)
and writes `<workdir>/report/` (each figure as PNG and PDF, each table as CSV):

- `by_source.*`, `by_layer.csv`, `layers_<source>.*`: class shares of *all* kernels (Figs. 7, 8,
  11, 19); `models.csv`: parameters, depthwise layers, kernels per size (Tables 1, 3, 4);
- `activation.*`: total activation per class (Fig. 10); `pca.*`: PCA scatter (Fig. 4);
- `kmeans_vs_ae.*`: the autoencoder's clustered share vs k-means under the same threshold;
- `labels.*`: per labelled interval, whether its kernels earn its name; `own_fit.*`: class shares
  by the run's names and by each kernel's own fit to the families, and their overlap;
- `samples_<source>.*`: random kernels per class and unfiltered (Figs. 5, 6);
  `--layers=13,14,15`: `layer_samples_<source>.*` (Figs. 20, 21);
- `--compare=a,b`: `compare_a_vs_b.*` (Figs. 18, 26); `--timeline=e5,e10,…`: `timeline.*` (Figs.
  24, 25); `kmeans_centroids.*` when the run has 3×3 centroids (appendix N);
- `index.html`: all of the above, with captions and the run's settings.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import ml_collections

from dwjax import cli
from dwjax.errors import RunDirError
from dwjax.io import assignment_files, atomic
from dwjax.io import workdir as workdir_lib
from dwjax.views import label_review, masterkey_sections
from dwjax.views import page as page_lib
from dwjax.views import sections, source_sections


def _settings(run: workdir_lib.RunDir) -> dict:
    try:
        with open(assignment_files.settings_path(run.assignments)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        log: Callable[[str], None] = print) -> dict:
    """Writes the tables, figures and `index.html`; returns `{"dir", "figures", "tables",
    "page"}` (figure paths are the PNGs). `config` is `configs/report.py`'s."""
    layers = _layers(config.layers)
    compare, timeline = _names(config.compare), _names(config.timeline)
    formats = list(dict.fromkeys(["png", *_names(config.formats)]))
    seed, kernel_size = config.seed, config.kernel_size
    rundir = workdir_lib.RunDir(workdir)
    stats = assignment_files.read_stats(rundir.assignments, kernel_size)
    if not stats:
        raise RunDirError(f"--workdir {workdir}: no assignments (run `python -m dwjax.assign` "
                          "first)")
    if len({s["kernel_size"] for s in stats}) > 1:
        raise RunDirError(f"--workdir {workdir}: assignments of several kernel sizes; pass "
                          "--kernel_size")
    # Built in a hidden directory and put in place whole: a failed or killed report leaves the
    # previous one (or none), never a partial page.
    atomic.clean_stale(rundir.path)
    out = atomic.temp_dir(rundir.path, "report")
    try:
        result = _write(rundir, stats, out, layers, compare, timeline, formats, seed, log)
        atomic.replace_dir(out, rundir.report)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    final = {k: ([_moved(p, out, rundir.report) for p in v] if isinstance(v, list)
                 else _moved(v, out, rundir.report)) for k, v in result.items()}
    log(f"{len(final['tables'])} tables and {len(final['figures'])} figures in {rundir.report}; "
        f"open {final['page']}")
    return final


def _moved(path: str, tmp: str, final: str) -> str:
    rel = os.path.relpath(path, tmp)
    return final if rel == "." else os.path.join(final, rel)


def _write(rundir: workdir_lib.RunDir, stats: list[dict], out: str, layers: list[int],
           compare: list[str], timeline: list[str], formats: list[str], seed: int,
           log: Callable[[str], None]) -> dict:
    ctx = sections.Context(rundir, stats, _settings(rundir), formats=tuple(formats), seed=seed,
                           log=log, out=out)
    entries = []
    steps = [("shares", sections.shares), ("models", source_sections.models),
             ("activation", sections.activation), ("PCA", sections.pca),
             ("k-means vs autoencoder", sections.kmeans_vs_autoencoder),
             ("labels", label_review.labels_section),
             ("own fit", label_review.own_fit_section),
             ("samples", sections.class_samples),
             ("regular vs depthwise", sections.regular_vs_depthwise),
             ("centroids", source_sections.centroids),
             ("master keys", masterkey_sections.master_keys)]
    if layers:
        steps.append(("layer samples", lambda c: sections.layer_samples(c, layers)))
    if compare:
        steps.append(("comparison", lambda c: source_sections.compare(c, compare)))
    if timeline:
        steps.append(("timeline", lambda c: source_sections.timeline(c, timeline)))
    for name, step in steps:
        new = step(ctx)
        ctx.release_pages()
        entries += new
        log(f"  {name}: {sum(len(e.figures) for e in new)} figures, "
            f"{sum(len(e.tables) for e in new)} tables")
    k = ctx.kernel_size
    page = page_lib.write_page(out, f"dwjax report: {k}×{k} kernels of "
                               f"{os.path.basename(os.path.normpath(rundir.path))}",
                               ctx.settings, entries)
    _log_summary(stats, log)
    figs = [f for e in entries for f in e.figures]
    tables = [t for e in entries for t in e.tables]
    return {"dir": out, "figures": figs, "tables": tables, "page": page}


def _log_summary(stats: list[dict], log: Callable[[str], None]) -> None:
    width = max(len(s["source"]) for s in stats + [{"source": "source"}])
    log(f"{'source'.ljust(width)}  kernels  clustered  top classes")
    for s in stats:
        counts = assignment_files.clustered_labels(s["labels"])
        top = sorted(counts.items(), key=lambda x: -x[1])[:3]
        n = max(1, s["kernels"])
        log(f"{s['source'].ljust(width)}  {s['kernels']:>7,}  {s['clustered'] / n:>8.1%}  "
            + ", ".join(f"{c} {v / n:.0%}" for c, v in top))


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _layers(value: str) -> list[int]:
    try:
        return [int(v) for v in _names(value)]
    except ValueError:
        raise sections.ReportError(f"--config.layers {value}: integers expected")


if __name__ == "__main__":
    cli.run_workdir_stage("report", run, "Run directory with assignments")
