"""The report's figures (library module): shares of all kernels as stacked bars (Figs. 7, 8, 11,
18, 24, 25), total-activation box plots (Fig. 10), the PCA scatter (Fig. 4), k-means vs the
autoencoder, and the k-means centroids (appendix N). Each function writes `<stem>.<fmt>` for every
format (`plotting.save`) and returns the paths, PNG first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dwjax.patterns import templates
from dwjax.views import plotting
from dwjax.views.plotting import plt

FORMATS = ("png", "pdf")
_PALETTE = plt.get_cmap("tab20").colors
_FIXED = {"On-Centre": 0, "Off-Centre": 1, "On-Centre Cross": 2, "Off-Centre Cross": 3,
          templates.FIRST_DERIVATIVE: 4, "On-Centre 1st derivative (x)": 4,
          "On-Centre 1st derivative (y)": 5, "Off-Centre 1st derivative (x)": 8,
          "Off-Centre 1st derivative (y)": 9, "On-Centre 2nd derivative": 6,
          "Off-Centre 2nd derivative": 7, "On-Square": 10, "Off-Square": 11}
UNCLUSTERED_COLOUR = "#dddddd"


def class_colour(name: str):
    """One colour per class across every figure of a report; "Others" grey."""
    if name == templates.OTHERS:
        return "#7f7f7f"
    if name in _FIXED:
        return _PALETTE[_FIXED[name]]
    return _PALETTE[12 + sum(map(ord, name)) % 8]


def _stack(ax, x: np.ndarray, classes: list[str], shares: np.ndarray, width: float = 0.8) -> None:
    bottom = np.zeros(len(x))
    for j, c in enumerate(classes):
        ax.bar(x, shares[:, j], bottom=bottom, width=width, color=class_colour(c), label=c,
               hatch="//" if c == templates.OTHERS else None, edgecolor="white", linewidth=0.3)
        bottom += shares[:, j]
    ax.bar(x, 1 - bottom, bottom=bottom, width=width, color=UNCLUSTERED_COLOUR,
           label="unclustered / dead (gap to 1)")


def plot_shares(names: Sequence[str], classes: list[str], shares: np.ndarray, stem: str,
                title: str, xlabel: str = "depthwise layer",
                formats: Sequence[str] = FORMATS) -> list[str]:
    """Stacked bars, `shares [len(names), len(classes)]` of *all* kernels of each bar."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 4.5), 4.2))
    _stack(ax, np.arange(len(names)), classes, shares)
    return finish_share_bars(fig, ax, names, "share of all kernels\n(grey gap to 1 = "
                             "unclustered)", xlabel, title, stem, formats)


def finish_share_bars(fig, ax, names: Sequence[str], ylabel: str, xlabel: str, title: str,
                      stem: str, formats: Sequence[str]) -> list[str]:
    """The axes of a stacked share-of-all-kernels bar chart (one bar per name), its legend on
    the right, then saved."""
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90 if max(map(len, names)) * len(names) > 60 else 0,
                       fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def plot_compare(panels: dict[str, tuple[list[str], np.ndarray]], classes: list[str], stem: str,
                 title: str, formats: Sequence[str] = FORMATS) -> list[str]:
    """One stacked-bar panel per source, layer by layer, on a shared y axis (Figs. 18, 26).

    Args:
      panels: `{source: (layer names, shares [L, len(classes)])}`.
    """
    n = len(panels)
    widest = max(len(v[0]) for v in panels.values())
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 0.3 * widest + 4.5), 2.4 * n + 0.6),
                             squeeze=False, sharey=True)
    for ax, (src, (layers, shares)) in zip(axes[:, 0], panels.items()):
        _stack(ax, np.arange(len(layers)), classes, shares)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, fontsize=7)
        ax.set_xlim(-0.6, widest - 0.4)
        ax.set_ylim(0, 1)
        ax.set_title(src, fontsize=8)
        ax.set_ylabel("share of all kernels", fontsize=7)
    axes[-1, 0].set_xlabel("depthwise layer (this kernel size, network order)", fontsize=8)
    axes[0, 0].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def plot_timeline(names: Sequence[str], classes: list[str], shares: np.ndarray,
                  clustered: np.ndarray, stem: str, title: str,
                  formats: Sequence[str] = FORMATS) -> list[str]:
    """Class shares per checkpoint (Fig. 24) beside the clustered fraction over time (Fig. 25)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(9.0, 0.6 * len(names) + 7), 3.8),
                               gridspec_kw={"width_ratios": [1.4, 1]})
    x = np.arange(len(names))
    _stack(a, x, classes, shares)
    a.set_xticks(x)
    a.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    a.set_ylim(0, 1)
    a.set_ylabel("share of all kernels", fontsize=8)
    a.set_title("class shares per checkpoint (Fig. 24)", fontsize=8)
    a.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    b.plot(x, clustered, "o-", color="k")
    b.set_xticks(x)
    b.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    b.set_ylim(0, 1)
    b.set_ylabel("clustered fraction", fontsize=8)
    b.set_title("clustered fraction over checkpoints (Fig. 25)", fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def plot_boxes(values: dict[str, np.ndarray], stem: str, title: str,
               formats: Sequence[str] = FORMATS) -> list[str]:
    """One box per class: quartiles, whiskers at 1.5 IQR, no outlier dots (Fig. 10)."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4.6))
    box = ax.boxplot([values[n] for n in names], showfliers=False, patch_artist=True,
                     medianprops={"color": "k"})
    for patch, n in zip(box["boxes"], names):
        patch.set_facecolor(class_colour(n))
    ax.axhline(0, color="k", lw=0.6, ls=":")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([f"{n}\n({len(values[n]):,})" for n in names], rotation=40, ha="right",
                       fontsize=7)
    ax.set_ylabel("total activation (sum of weights)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def plot_grouped_bars(groups: Sequence[str], columns: dict[str, np.ndarray], stem: str,
                      title: str, ylabel: str, formats: Sequence[str] = FORMATS) -> list[str]:
    """Grouped bars of shares: one group per name in `groups`, one bar per series of
    `columns {series: [G]}` (e.g. the clustered share per source for each method)."""
    per_group = min(1.4, 0.3 + 0.2 * len(columns))
    fig, ax = plt.subplots(figsize=(max(6.0, per_group * len(groups) + 3), 3.8))
    w = 0.8 / len(columns)
    for i, (name, vals) in enumerate(columns.items()):
        xs = np.arange(len(groups)) + (i - (len(columns) - 1) / 2) * w
        bars = ax.bar(xs, vals, width=w, label=name, color=_PALETTE[2 * i])
        ax.bar_label(bars, labels=[f"{v:.0%}" if v >= 0.095 else f"{v:.1%}" for v in vals],
                     fontsize=5 if len(groups) > 6 else 6, padding=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7, rotation=30 if len(groups) > 6 else 0,
                       ha="right" if len(groups) > 6 else "center")
    top = max([float(np.max(v)) for v in columns.values() if len(v)] + [0.0])
    ax.set_ylim(0, min(1.08, 1.15 * top + 0.02))
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)


def plot_pca(projection: np.ndarray, point_class: np.ndarray, samples: dict[str, np.ndarray],
             explained: np.ndarray, stem: str, title: str,
             formats: Sequence[str] = FORMATS) -> list[str]:
    """3-D scatter of `projection [N, 3]` coloured by `point_class [N]` (Fig. 4), with a column of
    sample kernels `[n, k, k]` for each of the classes in `samples` beside it."""
    fig = plt.figure(figsize=(11, 6.2))
    ax = fig.add_axes([0.0, 0.02, 0.6, 0.9], projection="3d")
    names = [c for c in dict.fromkeys(point_class.tolist())]
    order = sorted(names, key=lambda c: (c == "unclustered", -np.sum(point_class == c)))
    for c in order[::-1]:  # big classes drawn last, on top
        m = point_class == c
        colour = UNCLUSTERED_COLOUR if c == "unclustered" else class_colour(c)
        ax.scatter(*projection[m].T, s=2, color=colour, alpha=0.5, label=f"{c} ({m.sum():,})",
                   depthshade=False)
    for i, setter in enumerate((ax.set_xlabel, ax.set_ylabel, ax.set_zlabel)):
        setter(f"PC{i + 1} ({explained[i]:.0%})", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, markerscale=4, loc="upper left", bbox_to_anchor=(0.0, 1.0),
              frameon=False)
    per = max((len(v) for v in samples.values()), default=0)
    for col, (c, kernels) in enumerate(samples.items()):
        for row, kern in enumerate(kernels):
            sub = fig.add_axes([0.62 + col * 0.095, 0.78 - row * 0.76 / max(per, 1), 0.085,
                                0.7 / max(per, 1)])
            plotting.draw_kernel(sub, kern)
            if row == 0:
                sub.set_title(c, fontsize=7)
    fig.text(0.3, 0.97, title, fontsize=9, ha="center", va="top")
    fig.text(0.8, 0.97, "random kernels of the 4 largest classes", fontsize=9, ha="center",
             va="top")
    return plotting.save(fig, stem, formats)


def plot_centroids(centroids: np.ndarray, names: Sequence[str], stem: str, title: str,
                   formats: Sequence[str] = FORMATS) -> list[str]:
    """The k-means centroids `[K, k, k]` (min-max space, drawn centred), each with its name."""
    n = len(centroids)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (c, name) in enumerate(zip(centroids, names)):
        ax = axes.flat[i]
        plotting.draw_kernel(ax, c - c.mean())
        ax.set_title(f"{i}: {name}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plotting.save(fig, stem, formats)
