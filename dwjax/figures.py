"""Figures: the reconstructed spectrum (paper Fig. 3) and cluster-proportion bar plots (Figs. 7, 8, 11).

matplotlib with the Agg backend (no display); every function writes one PNG and returns its path.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dwjax import atomic  # noqa: E402


def _tile_strip(kernels: np.ndarray, gap: int = 1) -> np.ndarray:
    """`[T, k, k]` → one `[k, T*(k+gap)-gap]` image, each kernel scaled by its own max |w|."""
    t, k, _ = kernels.shape
    scale = np.abs(kernels).reshape(t, -1).max(axis=1)
    tiles = kernels / np.where(scale > 0, scale, 1)[:, None, None]
    strip = np.full((k, t * (k + gap) - gap), np.nan)
    for i in range(t):
        strip[:, i * (k + gap):i * (k + gap) + k] = tiles[i]
    return strip


def plot_spectrum(kernels: np.ndarray, codes: np.ndarray, path: str, labels: dict | None = None,
                  num_tiles: int = 60, title: str | None = None) -> str:
    """The code axis as a strip of decoded kernels with code ticks and, if given, labelled intervals.

    Args:
      kernels: `[M, k, k]` decoded unit kernels for `codes` `[M]` (sorted, in [0, 1]).
      labels: a labels dict (dwjax.labels); its intervals are drawn as coloured bands under the strip.
    """
    m, k, _ = kernels.shape
    pick = np.unique(np.linspace(0, m - 1, min(num_tiles, m)).round().astype(int))
    strip = _tile_strip(np.asarray(kernels)[pick])
    width = strip.shape[1]
    fig_h = 2.2 if labels else 1.4
    fig, ax = plt.subplots(figsize=(max(8, len(pick) * 0.28), fig_h))
    ax.imshow(strip, cmap="gray", vmin=-1, vmax=1, interpolation="nearest", aspect="equal",
              extent=(0, width, k, 0))
    step = k + 1
    ticks = list(range(0, len(pick), max(1, len(pick) // 12)))
    ax.set_xticks([i * step + k / 2 for i in ticks])
    ax.set_xticklabels([f"{codes[pick[i]]:.2f}" for i in ticks], fontsize=7)
    ax.set_yticks([])
    ax.xaxis.tick_top()  # code ticks above the strip, interval names below it
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("code", fontsize=8)
    if labels:
        cmap = plt.get_cmap("tab20")
        names = sorted({iv["label"] for iv in labels["intervals"]})
        picked = np.asarray(codes)[pick]
        for iv in labels["intervals"]:
            inside = np.flatnonzero((picked >= iv["start"]) & (picked <= iv["end"]))
            if len(inside) == 0:
                continue
            x0, x1 = inside[0] * step - 0.5, inside[-1] * step + k + 0.5
            ax.add_patch(plt.Rectangle((x0, k + 0.5), x1 - x0, 1.6, color=cmap(names.index(iv["label"]) % 20),
                                       clip_on=False))
            ax.text((x0 + x1) / 2, k + 3.2, iv["label"], ha="center", va="top", fontsize=6, rotation=30)
        ax.set_ylim(k + 0.5 + 1.7, 0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_gallery(groups: dict[str, np.ndarray], path: str, title: str, per_row: int = 8) -> str:
    """One row per group: up to `per_row` kernels `[n, k, k]` each (template bank, class samples)."""
    names = list(groups)
    fig, axes = plt.subplots(len(names), 1, figsize=(per_row * 0.6 + 4, 0.7 * len(names) + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        kernels = np.asarray(groups[name])[:per_row]
        ax.imshow(_tile_strip(kernels) if len(kernels) else np.zeros((1, 1)), cmap="gray", vmin=-1, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_proportions(rows: list[str], classes: list[str], fractions: np.ndarray, path: str, title: str,
                     xlabel: str = "layer") -> str:
    """Stacked bars: `fractions [len(rows), len(classes)]`, each row's share of every class."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 3), 4))
    cmap = plt.get_cmap("tab20")
    bottom = np.zeros(len(rows))
    for j, c in enumerate(classes):
        ax.bar(range(len(rows)), fractions[:, j], bottom=bottom, label=c, color=cmap(j % 20), width=0.85)
        bottom += fractions[:, j]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=90 if len(rows) > 8 else 0, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of clustered kernels")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130)
    finally:
        plt.close(fig)
    return path
