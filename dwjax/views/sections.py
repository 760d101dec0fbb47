"""The report's parts (library module): each reads what it needs from a run's assignments (and the
shards, when they are still there) and writes its CSV and figures under `<workdir>/report/`.

Every part returns a list of `Entry`: what the page (`page.write_page`) shows, with a caption naming
the paper's counterpart and how the numbers were computed.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

from dwjax.errors import UserError
from dwjax.io import assignment_files, atomic, shards
from dwjax.io import workdir as workdir_lib
from dwjax.model import preprocess
from dwjax.patterns import templates
from dwjax.search import kmeans
from dwjax.views import charts as rfig
from dwjax.views import plotting, tables


@dataclasses.dataclass
class Entry:
    """One section of the page: figures (PNG paths) and CSV tables with a caption."""
    title: str
    caption: str
    figures: list[str] = dataclasses.field(default_factory=list)
    tables: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Context:
    """What every part reads: the run, its per-shard statistics and settings, and where to write."""
    run: workdir_lib.RunDir
    stats: list[dict]
    settings: dict
    formats: Sequence[str] = rfig.FORMATS
    seed: int = 0
    log: Callable[[str], None] = print
    out: str = ""  # where the parts write: the report directory being built
    _rows: dict = dataclasses.field(default_factory=dict)
    _maps: list = dataclasses.field(default_factory=list)

    @property
    def kernel_size(self) -> int:
        return int(self.stats[0]["kernel_size"])

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def rows(self, s: dict, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """One shard's row columns `{name: [n]}` in shard order (cached per column for the shard
        last asked for: parts walk the shards in order, and holding every shard's columns would
        grow with the job, about 21 bytes a kernel)."""
        if s["shard_dir"] not in self._rows:
            for key in [k for k in self._rows if not isinstance(k, tuple)]:
                del self._rows[key]  # another shard's columns ("sha_ok" entries stay)
        cache = self._rows.setdefault(s["shard_dir"], {})
        missing = [c for c in columns if c not in cache]
        if missing:
            cache.update(assignment_files.read_rows(self.run.assignments, s, missing))
        return {c: cache[c] for c in columns}

    def kernels(self, s: dict) -> np.ndarray | None:
        """The shard's kernels `[n, k, k]` (memmap), or None when the shard is gone or was
        re-converted since it was assigned (rows would no longer match kernels)."""
        path = shards.kernel_file(s["data_dir"], s["shard_dir"], s["kernel_size"])
        if not os.path.exists(path):
            return None
        key = ("sha_ok", path)
        if key not in self._rows:
            self._rows[key] = shards.sha256_file(path) == s["shard_sha256"]
        if not self._rows[key]:
            return None
        kern = np.load(path, mmap_mode="r")
        self._maps.append(kern)
        return kern

    def release_pages(self) -> None:
        """Every shard page a part read leaves this process's resident memory (`shards.
        release_pages`): random reads fault whole read-ahead windows in, so a part that samples
        a shard would otherwise keep most of it mapped."""
        for kern in self._maps:
            shards.release_pages(kern, 0, len(kern))
        self._maps.clear()

    def source(self, name: str) -> dict:
        for s in self.stats:
            if s["source"] == name:
                return s
        known = ", ".join(s["source"] for s in self.stats)
        raise ReportError(f"{name!r}: no such source in {self.run.assignments} (known: {known})")


class ReportError(UserError):
    """A report flag names something the run does not have (one-line message)."""


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    with atomic.atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _f(x: float) -> str:
    return f"{x:.6f}"


def _slug(name: str) -> str:
    return shards.slugify(name)


# ------------------------------------------------------------------------------- 1. shares
SHARES_CAPTION = ("Each bar is one {what}; each colour a class's count over <b>all</b> kernels of "
                  "that {what} (dead and unclustered included), so the coloured part is the "
                  "clustered fraction and the grey gap to 1 the unclustered kernels, as the "
                  "paper's bars ('excluding indiscernible patterns, hence proportions do not total "
                  "to 1', §5). The four first-derivative subtypes are merged into one bar "
                  "(Fig. 7); "
                  "'Others' (hatched): clustered kernels whose code lies in no interval of "
                  "labels.json (the labels name no pattern there). The CSV "
                  "keeps every class apart; its class columns sum to clustered_fraction.")


def shares(ctx: Context) -> list[Entry]:
    """`by_source.csv`, `by_layer.csv` and their stacked bars (Figs. 7, 8, 11; Fig. 19's gaps)."""
    classes = tables.run_classes(ctx.stats)
    src_share = tables.shares_of_all(ctx.stats, classes)
    frac = tables.clustered_fraction(ctx.stats)
    write_csv(ctx.path("by_source.csv"), ["source", "kernels", "clustered_fraction", *classes],
              [[s["source"], s["kernels"], _f(f), *map(_f, row)]
               for s, f, row in zip(ctx.stats, frac, src_share)])
    names = [s["source"] for s in ctx.stats]
    entry = Entry("Class shares per source (paper Fig. 11; Tables 3/4's clustered share)",
                  SHARES_CAPTION.format(what="source"),
                  rfig.plot_shares(names, *tables.merged(classes, src_share),
                                   ctx.path("by_source"), "class shares of all kernels per source",
                                   xlabel="source", formats=ctx.formats)[:1],
                  [ctx.path("by_source.csv")])
    layer_rows = []
    layer_entry = Entry(
        "Class shares per depthwise layer (paper Figs. 7, 8, 19, 33–38)",
        SHARES_CAPTION.format(what="depthwise layer") + " Layers are numbered among this kernel "
        "size's depthwise layers in network order (by_layer.csv's position); its layer column is "
        "the layer's id among all the network's depthwise layers.",
        tables=[ctx.path("by_layer.csv")])
    for s in ctx.stats:
        layers = s["layers"]
        sh = tables.shares_of_all(layers, classes)
        lf = tables.clustered_fraction(layers)
        for position, (l, f, row) in enumerate(zip(layers, lf, sh)):
            layer_rows.append([s["source"], position, l["layer"], l["layer_name"], l["kernels"],
                               _f(f), *map(_f, row)])
        layer_entry.figures += rfig.plot_shares(
            [str(i) for i in range(len(layers))], *tables.merged(classes, sh),
            ctx.path(f"layers_{_slug(s['source'])}"),
            f"{s['source']}: class shares of all kernels per depthwise layer", formats=ctx.formats
        )[:1]
    write_csv(ctx.path("by_layer.csv"), ["source", "position", "layer", "layer_name", "kernels",
                                         "clustered_fraction", *classes], layer_rows)
    return [entry, layer_entry]


# ---------------------------------------------------------------------- 2. total activation
def activation(ctx: Context) -> list[Entry]:
    """`activation.csv` (quartiles per class) and its box plots (Fig. 10)."""
    cols = ("label", "clustered", "total_activation")
    label, total = [], []
    for s in ctx.stats:  # the clustered rows only: 12 bytes a kernel held, not every column
        r = ctx.rows(s, cols)
        label.append(r["label"][r["clustered"]])
        total.append(r["total_activation"][r["clustered"]])
    label, total = np.concatenate(label), np.concatenate(total)
    rows = tables.activation_quartiles(label, np.ones(len(label), bool), total)
    if not rows:
        return []
    write_csv(ctx.path("activation.csv"), tables.QUARTILE_COLUMNS,
              [[row[0], row[1], *map(_f, row[2:])] for row in rows])
    values = {row[0]: total[label == row[0]] for row in rows}
    figs = rfig.plot_boxes(values, ctx.path("activation"),
                           "total activation (sum of raw weights) per class, every source",
                           formats=ctx.formats)
    return [Entry("Total activation per class (paper Fig. 10)",
                  "Box plots of each clustered kernel's total activation (the sum of its raw "
                  "weights, the <code>total_activation</code> column of the rows), every source "
                  "pooled: box = quartiles, whiskers = 1.5 IQR, outliers not drawn. The paper "
                  "finds first-derivative classes centred at zero and On-Centre positive.",
                  figs[:1], [ctx.path("activation.csv")])]


# ------------------------------------------------------------------------------------ 3. PCA
def _sample(ctx: Context, n_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Up to `n_max` live kernels drawn evenly over every shard with the seed:
    `(kernels [n, k, k], label [n], clustered [n])`, or None without shards."""
    parts = []
    for s in ctx.stats:
        k = ctx.kernels(s)
        if k is None:
            return None
        r = ctx.rows(s, ("label", "clustered"))
        parts.append((k, r["label"], r["clustered"]))
    total = sum(len(p[0]) for p in parts)
    rng = np.random.default_rng(ctx.seed)
    out = []
    for k, label, cl in parts:
        take = min(len(k), int(np.ceil(n_max * len(k) / max(total, 1))))
        idx = np.sort(rng.choice(len(k), take, replace=False))
        kern = shards.take_rows(k, idx)
        live = preprocess.valid_mask(kern)
        out.append((kern[live], label[idx][live], cl[idx][live]))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))


def pca_sample(ctx: Context, n_max: int = 20_000):
    """The kernels the PCA part uses (tests recompute the explained variance from them)."""
    return _sample(ctx, n_max)


def pca(ctx: Context) -> list[Entry]:
    """`pca.csv` (explained variance) and the 3-D scatter with sample kernels (Fig. 4)."""
    sample = pca_sample(ctx)
    if sample is None:
        return []
    kern, label, cl = sample
    p = tables.pca(kern)
    write_csv(ctx.path("pca.csv"), ["component", "explained_variance", "explained_variance_ratio"],
              [[i + 1, _f(v), _f(r)] for i, (v, r) in enumerate(
                  zip(p["explained_variance"], p["explained_variance_ratio"]))])
    point = np.where(cl, [templates.merged_class(c) for c in label], "unclustered")
    counts = {c: int(np.sum(point == c))  # the clear classes: neither unclustered nor Others
              for c in set(point.tolist()) - {"unclustered", templates.OTHERS}}
    top = sorted(counts, key=lambda c: -counts[c])[:4]
    rng = np.random.default_rng(ctx.seed)
    samples = {c: kern[rng.choice(np.flatnonzero(point == c), min(5, counts[c]), replace=False)]
               for c in top}
    figs = rfig.plot_pca(p["projection"], point, samples, p["explained_variance_ratio"],
                         ctx.path("pca"), f"PCA of {len(kern):,} centred unit kernels",
                         formats=ctx.formats)
    return [Entry("PCA of the kernels (paper Fig. 4)",
                  f"{len(kern):,} live kernels drawn evenly over every source (seed {ctx.seed}), "
                  "each centred and scaled to unit length, then the sample mean removed and "
                  "projected on its first three principal components (SVD); coloured by assigned "
                  "class (first-derivative subtypes merged), with 5 random kernels of each of the "
                  "4 largest classes beside it. The CSV lists every component's explained "
                  "variance.", figs[:1], [ctx.path("pca.csv")])]


# ----------------------------------------------------------------- 4. k-means vs autoencoder
def _embed_valid(kernels) -> tuple[np.ndarray, np.ndarray]:
    """`[m, k, k]` → (`[n, k*k-1]` unit hyperplane coordinates of the live kernels, live `[m]`)."""
    valid = preprocess.valid_mask(kernels)
    return np.asarray(preprocess.embed(np.asarray(kernels[valid]))), valid


def _kmeans_clustered_count(kern, centroids: np.ndarray, threshold: float,
                            chunk: int = kmeans.DEFAULT_CHUNK) -> int:
    """How many live kernels of a shard `[N, k, k]` `tables.kmeans_clustered` counts, read `chunk`
    rows at a time (memory O(chunk), not O(N))."""
    n = 0
    for a in range(0, len(kern), chunk):
        x, _ = _embed_valid(kern[a:a + chunk])
        shards.release_pages(kern, a, a + chunk)
        n += int(tables.kmeans_clustered(x, centroids, threshold).sum())
    return n


def kmeans_vs_autoencoder(ctx: Context, max_fit: int = 200_000) -> list[Entry]:
    """The reviewers' question on the user's kernels: would k-means do? (`kmeans_vs_ae.csv`).
    Fitted on up to `max_fit` live kernels, every kernel judged: memory O(max_fit), not O(N)."""
    if ctx.settings.get("method") != "autoencoder":
        return []
    threshold = float(ctx.settings["threshold"])
    arrays = [ctx.kernels(s) for s in ctx.stats]
    if any(a is None for a in arrays):
        return []
    fit = kmeans.sample_valid(arrays, max_fit, ctx.seed, encode=_embed_valid)
    with open(ctx.run.labels_json) as f:
        n_intervals = len(json.load(f)["intervals"])
    # a run with fewer than 2 labelled intervals (the random-init control) compares 10 only
    ks = [k for k in dict.fromkeys([10, n_intervals]) if 2 <= k <= len(fit)]
    if not ks:
        return []
    verdicts = {}
    for k in ks:
        centroids, _ = kmeans.fit_kmeans(fit, k, ctx.seed)
        verdicts[k] = [_kmeans_clustered_count(a, centroids, threshold) for a in arrays]
    rows, cols = [], {"autoencoder": [], **{f"k-means ({k})": [] for k in ks}}
    for s, i in zip(ctx.stats, range(len(ctx.stats))):
        ae = s["clustered"] / max(1, s["kernels"])
        km = [verdicts[k][i] / max(1, s["kernels"]) for k in ks]
        rows.append([s["source"], s["kernels"], _f(ae), *map(_f, km)])
        cols["autoencoder"].append(ae)
        for k, v in zip(ks, km):
            cols[f"k-means ({k})"].append(v)
    header = ["source", "kernels", "autoencoder", *(f"kmeans_{k}" for k in ks)]
    write_csv(ctx.path("kmeans_vs_ae.csv"), header, rows)
    figs = rfig.plot_grouped_bars(
        [s["source"] for s in ctx.stats], {c: np.asarray(v) for c, v in cols.items()},
        ctx.path("kmeans_vs_ae"), f"clustered share at cosine dissimilarity < {threshold}",
        "clustered share of all kernels", formats=ctx.formats)
    return [Entry("Would k-means do? Autoencoder vs k-means",
                  f"Clustered share of all kernels per source. Autoencoder: the run's rows "
                  f"(nearest of {ctx.settings.get('num_codes')} decoded codes). k-means: "
                  f"centroids fitted (k-means++, seed {ctx.seed}, on up to {max_fit:,} kernels "
                  f"pooled over every source) on the same preprocessed kernels (centred, unit, "
                  f"hyperplane coordinates), with {' and with '.join(map(str, ks))} clusters "
                  f"(10, and as many as labels.json has intervals: {n_intervals}); each kernel "
                  f"is clustered when its cosine "
                  f"dissimilarity to the nearest normalised centroid is below the same "
                  f"threshold {threshold}.", figs[:1], [ctx.path("kmeans_vs_ae.csv")])]


# ------------------------------------------------------------------------- 5. sample grids
def class_samples(ctx: Context, per_class: int = 12) -> list[Entry]:
    """Random clustered kernels of each class per source (Figs. 5, 6) and unfiltered random
    kernels per source."""
    figs = []
    rng = np.random.default_rng(ctx.seed)
    for s in ctx.stats:
        kern = ctx.kernels(s)
        if kern is None:
            continue
        r = ctx.rows(s, ("clustered", "label"))
        rows = np.flatnonzero(r["clustered"])
        label = r["label"][rows]
        groups = {}
        for c in tables.class_order(label):
            members = rows[label == c]
            pick = np.sort(rng.choice(members, min(per_class, len(members)), False))
            groups[f"{c} ({len(members):,})"] = shards.take_rows(kern, pick)
        pick = rng.choice(len(kern), min(2 * per_class, len(kern)), False)
        anyk = shards.take_rows(kern, np.sort(pick))
        groups["unfiltered random"] = anyk[:per_class]
        groups["unfiltered random "] = anyk[per_class:]
        figs.append(plotting.plot_gallery(
            groups, ctx.path(f"samples_{_slug(s['source'])}.png"),
            f"{s['source']}: random clustered kernels per class (count); last rows unfiltered",
            per_row=per_class, formats=[f for f in ctx.formats if f != "png"]))
    return [Entry("Random kernels per class (paper Figs. 5, 6, 9)",
                  f"Per source, up to {per_class} random clustered kernels of each class (count "
                  f"in brackets) and, in the last two rows, {2 * per_class} random kernels "
                  "drawn without any filter (clustered or not). Each kernel is scaled by its "
                  "own max |w|; red positive, blue negative, white zero.", figs)] if figs else []


def layer_samples(ctx: Context, layers: Sequence[int], per_layer: int = 16) -> list[Entry]:
    """Random kernels of chosen layers of every source (Figs. 20, 21; `--layers`)."""
    figs = []
    rng = np.random.default_rng(ctx.seed)
    for s in ctx.stats:
        kern = ctx.kernels(s)
        if kern is None:
            continue
        layer = ctx.rows(s, ("layer",))["layer"]
        ids = [l["layer"] for l in s["layers"]]
        groups = {}
        for i in layers:
            if not 0 <= i < len(ids):
                raise ReportError(f"--layers {i}: {s['source']} has {len(ids)} "
                                  f"{ctx.kernel_size}x{ctx.kernel_size} depthwise layers")
            m = np.flatnonzero(layer == ids[i])
            pick = np.sort(rng.choice(m, min(per_layer, len(m)), False))
            groups[f"layer {i} ({s['layers'][i]['clustered'] / max(1, len(m)):.0%} clustered)"] = \
                shards.take_rows(kern, pick)
        figs.append(plotting.plot_gallery(
            groups, ctx.path(f"layer_samples_{_slug(s['source'])}.png"),
            f"{s['source']}: random kernels of chosen layers (clustered share)",
            per_row=per_layer, formats=[f for f in ctx.formats if f != "png"]))
    return [Entry("Random kernels of chosen layers (paper Figs. 20, 21)",
                  f"{per_layer} random kernels (unfiltered) of each layer asked for with "
                  "--layers (numbered as in the per-layer bars), per source.", figs)]


def regular_vs_depthwise(ctx: Context, per_row: int = 12, rows: int = 3) -> list[Entry]:
    """Random regular-convolution kernels beside random depthwise ones of the same size, per
    source (paper Fig. 2), from the sample `convert` keeps (`--regular_sample`)."""
    figs = []
    rng = np.random.default_rng(ctx.seed)
    k = ctx.kernel_size
    for s in ctx.stats:
        regular, depthwise = shards.read_regular(s["data_dir"], s["shard_dir"], k), ctx.kernels(s)
        if regular is None or depthwise is None or not len(regular):
            continue
        n = min(per_row * rows, len(regular))
        reg = regular[np.sort(rng.choice(len(regular), n, False))]
        dw = shards.take_rows(depthwise, np.sort(rng.choice(len(depthwise), n, False)))
        groups = {}
        for i in range(0, n, per_row):
            groups[f"regular {k}×{k}" + " " * (i // per_row)] = reg[i:i + per_row]
        for i in range(0, n, per_row):
            groups[f"depthwise {k}×{k}" + " " * (i // per_row)] = dw[i:i + per_row]
        figs.append(plotting.plot_gallery(
            groups, ctx.path(f"regular_vs_depthwise_{_slug(s['source'])}.png"),
            f"{s['source']}: random regular-convolution vs depthwise {k}×{k} kernels",
            per_row=per_row, formats=[f for f in ctx.formats if f != "png"]))
    return [Entry("Regular vs depthwise kernels (paper Fig. 2)",
                  "Per source, random k×k kernels of its regular convolutions (each input-output "
                  "pair of an [O, I, k, k] weight is one kernel; a sample kept by convert, never "
                  "trained on or assigned) above random depthwise kernels of the same size. Each "
                  "kernel is scaled by its own max |w|.", figs)] if figs else []
