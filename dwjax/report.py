"""Stage 5: every table and figure of the paper for one run, gathered on one page.
`python -m dwjax.report --workdir=…`

Reads the per-shard statistics and rows `assign` wrote (and the shards, when they are still there)
and writes `<workdir>/report/` (each figure as PNG and PDF, each table as CSV):

- `by_source.*`, `by_layer.csv`, `layers_<source>.*`: class shares of *all* kernels (Figs. 7, 8,
  11, 19); `models.csv`: parameters, depthwise layers, kernels per size (Tables 1, 3, 4);
- `activation.*`: total activation per class (Fig. 10); `pca.*`: PCA scatter (Fig. 4);
- `kmeans_vs_ae.*`: the autoencoder's clustered share vs k-means under the same threshold;
- `samples_<source>.*`: random kernels per class and unfiltered (Figs. 5, 6);
  `--layers=13,14,15`: `layer_samples_<source>.*` (Figs. 20, 21);
- `--compare=a,b`: `compare_a_vs_b.*` (Figs. 18, 26); `--timeline=e5,e10,…`: `timeline.*` (Figs.
  24, 25); `kmeans_centroids.*` when the run has 3×3 centroids (appendix N);
- `index.html`: all of the above, with captions and the run's settings.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from absl import app, flags

from dwjax import assignments, cli, paths, report_page, report_parts, report_runs
from dwjax import workdir as workdir_lib
from dwjax.errors import RunDirError


def _settings(run: workdir_lib.RunDir) -> dict:
    try:
        with open(assignments.settings_path(run.assignments)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_report(workdir: str, layers: Sequence[int] = (), compare: Sequence[str] = (),
               timeline: Sequence[str] = (), formats: Sequence[str] = ("png", "pdf"),
               seed: int = 0, kernel_size: int | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Writes the tables, figures and `index.html`; returns `{"dir", "figures", "tables",
    "page"}` (figure paths are the PNGs)."""
    run = workdir_lib.RunDir(workdir)
    stats = assignments.read_stats(run.assignments, kernel_size)
    if not stats:
        raise RunDirError(f"--workdir {workdir}: no assignments (run `python -m dwjax.assign` "
                          "first)")
    if len({s["kernel_size"] for s in stats}) > 1:
        raise RunDirError(f"--workdir {workdir}: assignments of several kernel sizes; pass "
                          "--kernel_size")
    os.makedirs(run.report, exist_ok=True)
    ctx = report_parts.Context(run, stats, _settings(run), formats=tuple(formats), seed=seed,
                               log=log)
    entries = []
    steps = [("shares", report_parts.shares), ("models", report_runs.models),
             ("activation", report_parts.activation), ("PCA", report_parts.pca),
             ("k-means vs autoencoder", report_parts.kmeans_vs_autoencoder),
             ("samples", report_parts.class_samples),
             ("regular vs depthwise", report_parts.regular_vs_depthwise),
             ("centroids", report_runs.centroids)]
    if layers:
        steps.append(("layer samples", lambda c: report_parts.layer_samples(c, layers)))
    if compare:
        steps.append(("comparison", lambda c: report_runs.compare(c, compare)))
    if timeline:
        steps.append(("timeline", lambda c: report_runs.timeline(c, timeline)))
    for name, step in steps:
        new = step(ctx)
        entries += new
        log(f"  {name}: {sum(len(e.figures) for e in new)} figures, "
            f"{sum(len(e.tables) for e in new)} tables")
    k = ctx.kernel_size
    page = report_page.write_page(run.report, f"dwjax report: {k}×{k} kernels of "
                                  f"{os.path.basename(os.path.normpath(workdir))}",
                                  ctx.settings, entries)
    _log_summary(stats, log)
    figs = [f for e in entries for f in e.figures]
    tables = [t for e in entries for t in e.tables]
    log(f"{len(tables)} tables and {len(figs)} figures in {run.report}; open {page}")
    return {"dir": run.report, "figures": figs, "tables": tables, "page": page}


def _log_summary(stats: list[dict], log: Callable[[str], None]) -> None:
    width = max(len(s["source"]) for s in stats + [{"source": "source"}])
    log(f"{'source'.ljust(width)}  kernels  clustered  top classes")
    for s in stats:
        top = sorted(assignments.clustered_labels(s["labels"]).items(), key=lambda x: -x[1])[:3]
        n = max(1, s["kernels"])
        log(f"{s['source'].ljust(width)}  {s['kernels']:>7,}  {s['clustered'] / n:>8.1%}  "
            + ", ".join(f"{c} {v / n:.0%}" for c, v in top))


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None,
                        "Run directory with assignments (default $DWJAX_HOME/runs/k<kernel_size>).")
    flags.DEFINE_integer("kernel_size", 5, "Picks the default workdir when --workdir is not given.")
    flags.DEFINE_list("layers", [], "Depthwise layers (numbered as in the per-layer bars) to draw "
                      "random samples of, e.g. 13,14,15 (paper Figs. 20, 21).")
    flags.DEFINE_list("compare", [], "Two or more source ids to compare layer by layer "
                      "(Figs. 18, 26).")
    flags.DEFINE_list("timeline", [], "Source ids that are checkpoints of one training run, in "
                      "time order (Figs. 24, 25).")
    flags.DEFINE_list("formats", ["png", "pdf"], "Figure formats (png is always written).")
    flags.DEFINE_integer("seed", 0, "Seed of every random sample.")


def _layers(values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise report_parts.ReportError(f"--layers {','.join(values)}: integers expected")


def main(argv):
    del argv
    cli.setup(uses_jax=True)
    with cli.user_errors("report"):
        run_report(FLAGS.workdir or paths.default_workdir(FLAGS.kernel_size),
                   _layers(FLAGS.layers), FLAGS.compare, FLAGS.timeline,
                   ["png", *FLAGS.formats], FLAGS.seed)


if __name__ == "__main__":
    define_flags()
    app.run(main)
