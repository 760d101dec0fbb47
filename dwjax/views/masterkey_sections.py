"""The report's master-key part (library module): present when `python -m dwjax.masterkeys` has
written rows for the run (`<workdir>/masterkeys/`, dwjax.io.masterkey_files).

It shows the bank as a grid with each filter's share of all kernels; each filter's share per
source and per depthwise layer as stacked bars (shares of *all* kernels, dead ones the gap to 1,
as the paper's bars); the distribution of the explained fraction r2; the coverage curve beside
PCA components and k-means centroids of the same sample; and the functional check's table when it
was run.
"""
from __future__ import annotations

import json

import numpy as np

from dwjax.io import assignment_files, shards
from dwjax.io import masterkey_files as mk_files
from dwjax.views import charts, plotting
from dwjax.views.plotting import plt
from dwjax.views.sections import Context, Entry, write_csv

_DEAD_COLOUR = "#dddddd"


def _colour(j: int):
    return plt.get_cmap("tab20" if j >= 10 else "tab10")(j % 20 if j >= 10 else j)


def _settings(out_dir: str) -> dict:
    try:
        with open(assignment_files.settings_path(out_dir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def filter_shares(groups: list[dict], num_filters: int) -> np.ndarray:
    """`[len(groups), K]`: each filter's count over *all* kernels of each group (a shard's or a
    layer's statistics); a row sums to the fitted fraction."""
    names = mk_files.filter_names(num_filters)[:-1]
    return np.asarray([[g["labels"].get(n, 0) / max(1, g["kernels"]) for n in names]
                       for g in groups], np.float64).reshape(len(groups), num_filters)


def _bars(names: list[str], shares: np.ndarray, stem: str, title: str, xlabel: str,
          formats) -> list[str]:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 4.5), 4.0))
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for j in range(shares.shape[1]):
        ax.bar(x, shares[:, j], bottom=bottom, color=_colour(j), label=f"filter {j}",
               edgecolor="white", linewidth=0.3)
        bottom += shares[:, j]
    ax.bar(x, 1 - bottom, bottom=bottom, color=_DEAD_COLOUR, label="dead (gap to 1)")
    return charts.finish_share_bars(fig, ax, names, "share of all kernels", xlabel, title, stem,
                                    formats)


def _bank_figure(bank: np.ndarray, share: np.ndarray, mean_r2: np.ndarray, stem: str,
                 formats) -> list[str]:
    k = len(bank)
    cols = min(k, 8)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols + 0.3, 1.45 * rows + 0.5),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, f in enumerate(bank):
        ax = axes[j // cols, j % cols]
        ax.axis("on")
        plotting.draw_kernel(ax, f)
        ax.set_title(f"filter {j}\n{share[j]:.1%}, r2 {mean_r2[j]:.2f}", fontsize=7)
    fig.suptitle(f"master key filters ({k}): share of all kernels, mean r2", fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def _coverage_figure(table: list[dict], k_bank: int, stem: str, formats) -> list[str]:
    def col(name):
        return np.asarray([float(r[name]) if r[name] else np.nan for r in table])

    K = col("K")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(K, col("master_keys"), "o-", label="master keys (greedy)", color="C0")
    ax.plot(K, col("pca"), "s-", label="PCA components, as single filters", color="C1")
    ax.plot(K, col("pca_subspace"), ":", label="PCA subspace (any combination)", color="C1")
    km = col("kmeans")
    ax.plot(K[np.isfinite(km)], km[np.isfinite(km)], "^--", label="k-means centroids",
            color="C2")
    ax.axvline(k_bank, color="#999999", linewidth=0.8)
    ax.set_xlabel("filters K", fontsize=8)
    ax.set_ylabel("mean explained fraction", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("coverage: each kernel fitted to its best single filter", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def _r2_figure(values: dict[str, np.ndarray], stem: str, formats) -> list[str]:
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    bins = np.linspace(0, 1, 41)
    for name, v in values.items():
        ax.hist(v, bins=bins, histtype="step", density=True, label=name, linewidth=1.2)
    ax.set_xlabel("explained fraction r2 of the best filter", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title("how much of each kernel its master key explains", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def _functional_figure(table: list[dict], stem: str, formats) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for variant in dict.fromkeys(r["variant"] for r in table):
        rows = [r for r in table if r["variant"] == variant]
        K = [int(r["K"]) for r in rows]
        for ax, name in zip(axes, ("top1_agreement", "logit_cosine")):
            ax.plot(K, [float(r[name]) for r in rows], "o-", label=variant)
    for ax, name in zip(axes, ("top-1 agreement", "mean logit cosine")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("filters K", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{table[0]['network']}: original vs depthwise kernels replaced", fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def _copied(ctx: Context, path: str, name: str) -> list[dict] | None:
    """A table of the run's masterkeys folder, copied into the report as `name`; its rows."""
    rows = mk_files.read_table(path)
    if rows:
        write_csv(ctx.path(name), list(rows[0]), [list(r.values()) for r in rows])
    return rows


def master_keys(ctx: Context) -> list[Entry]:
    """The master-key part, or nothing when the run has no master-key rows."""
    folder = ctx.run.masterkeys
    out_dir = mk_files.rows_dir(folder)
    stats = assignment_files.read_stats(out_dir, ctx.kernel_size)
    bank = mk_files.read_bank(folder)
    if not stats or bank is None:
        return []
    k_bank = len(bank)
    settings = _settings(out_dir)
    if settings.get("num_filters", k_bank) != k_bank:
        return []  # rows of another bank than the one on disk: a job in progress
    names = mk_files.filter_names(k_bank)[:-1]
    # per filter, over every source: kernels and mean r2 (from the rows)
    count = np.zeros(k_bank)
    r2_sum = np.zeros(k_bank)
    r2_by_source = {}
    for s in stats:
        r = assignment_files.read_rows(out_dir, s, ("filter", "r2"))
        live = r["filter"] >= 0
        count += np.bincount(r["filter"][live], minlength=k_bank)
        r2_sum += np.bincount(r["filter"][live], weights=r["r2"][live], minlength=k_bank)
        r2_by_source[s["source"]] = r["r2"][live]
    total = sum(s["kernels"] for s in stats)
    mean_r2 = r2_sum / np.maximum(count, 1)
    write_csv(ctx.path("masterkeys_bank.csv"), ["filter", "kernels", "share_of_all", "mean_r2",
                                                *(f"w{i}" for i in range(bank[0].size))],
              [[j, int(count[j]), f"{count[j] / max(1, total):.6f}", f"{mean_r2[j]:.6f}",
                *(f"{v:.7g}" for v in bank[j].ravel())] for j in range(k_bank)])
    figs = _bank_figure(bank, count / max(1, total), mean_r2, ctx.path("masterkeys_bank"),
                        ctx.formats)[:1]
    src_share = filter_shares(stats, k_bank)
    write_csv(ctx.path("masterkeys_by_source.csv"), ["source", "kernels", "fitted_fraction",
                                                     *names],
              [[s["source"], s["kernels"], f"{s['clustered'] / max(1, s['kernels']):.6f}",
                *(f"{v:.6f}" for v in row)] for s, row in zip(stats, src_share)])
    figs += _bars([s["source"] for s in stats], src_share, ctx.path("masterkeys_by_source"),
                  "master key filters: share of all kernels per source", "source",
                  ctx.formats)[:1]
    layer_rows = []
    for s in stats:
        share = filter_shares(s["layers"], k_bank)
        for position, (layer, row) in enumerate(zip(s["layers"], share)):
            layer_rows.append([s["source"], position, layer["layer"], layer["layer_name"],
                               layer["kernels"], *(f"{v:.6f}" for v in row)])
        figs += _bars([str(i) for i in range(len(s["layers"]))], share,
                      ctx.path(f"masterkeys_layers_{shards.slugify(s['source'])}"),
                      f"{s['source']}: master key filters per depthwise layer",
                      "depthwise layer", ctx.formats)[:1]
    write_csv(ctx.path("masterkeys_by_layer.csv"), ["source", "position", "layer", "layer_name",
                                                    "kernels", *names], layer_rows)
    quart = [[src, len(v), *(f"{q:.6f}" for q in np.percentile(v, [0, 25, 50, 75, 100])),
              f"{v.mean():.6f}"] for src, v in r2_by_source.items() if len(v)]
    write_csv(ctx.path("masterkeys_r2.csv"), ["source", "kernels", "min", "q25", "median", "q75",
                                              "max", "mean"], quart)
    figs += _r2_figure(r2_by_source, ctx.path("masterkeys_r2"), ctx.formats)[:1]
    tables = [ctx.path(n) for n in ("masterkeys_bank.csv", "masterkeys_by_source.csv",
                                    "masterkeys_by_layer.csv", "masterkeys_r2.csv")]
    entries = [Entry(
        f"Master key filters: {k_bank} filters fit every kernel",
        f"The bank ({settings.get('bank', '?')}): every live {ctx.kernel_size}×"
        f"{ctx.kernel_size} kernel y is fitted to its best filter x sign-free, y ≈ a·x + b with "
        "b = mean(y), a = (y − b)·x, and r2 = a²/‖y − b‖² the fraction of its centred energy "
        "the filter explains (Babaiee et al., AAAI 2025; Lindeberg et al., JMIV 2026). The grid "
        "shows each filter with its share of all kernels and its kernels' mean r2; the bars "
        "each filter's share of all kernels per source and per depthwise layer (dead kernels "
        "are the grey gap to 1); the histogram the distribution of r2 per source. Filter j is "
        "bank.npy[j] and bank.txt's 'Filter j+1'.", figs, tables)]
    coverage = _copied(ctx, mk_files.coverage_csv(folder), "masterkeys_coverage_curve.csv")
    if coverage:
        entries.append(Entry(
            "Do K filters suffice? The coverage curve",
            "Mean explained fraction of the sampled live kernels when each is fitted to its "
            "best single filter among the first K: the master keys in their greedy order "
            f"(the bank is the first {k_bank}, grey line); the K leading principal components of "
            "the unit kernels (second moment, no mean removed) used the same way; the span of "
            "those K components (any linear combination: a ceiling no K single filters reach); "
            "and k-means centroids (K = 1, 2, 4, 8, 16: the report's k-means on the same "
            "coordinates, centroids centred and normalised).",
            _coverage_figure(coverage, k_bank, ctx.path("masterkeys_coverage"),
                             ctx.formats)[:1], [ctx.path("masterkeys_coverage_curve.csv")]))
    functional = _copied(ctx, mk_files.functional_csv(folder), "masterkeys_agreement.csv")
    if functional:
        entries.append(Entry(
            "Does the network still work? The functional check",
            f"{functional[0]['network']} with every depthwise {ctx.kernel_size}×"
            f"{ctx.kernel_size} kernel replaced, on {functional[0]['views']} views (2 scales, 5 "
            "crops, mirrored) of the photographs scikit-image ships: top-1 agreement with the "
            "original network and the mean cosine of the two networks' logits. 'master keys': "
            "each kernel's fit to the first K filters; 'random bank': its fit to K random "
            "filters; 'shuffled filters': the bank's fits with the filter indices permuted "
            "among each layer's channels (scales and offsets kept).",
            _functional_figure(functional, ctx.path("masterkeys_agreement"),
                               ctx.formats)[:1], [ctx.path("masterkeys_agreement.csv")]))
    return entries

