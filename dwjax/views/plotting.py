"""Figures shared by the stages: the reconstructed spectrum (paper Figs. 3, 31, 32), kernel
galleries, one kernel drawn, and `save` (every figure of dwjax is written through it).

Kernels are drawn in diverging colours centred on zero (vmin = −vmax) without interpolation.
Library modules never switch the matplotlib backend: a stage gets Agg from `cli.setup`, a notebook
keeps its own.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from dwjax.io import atomic

DPI = 130
KERNEL_CMAP = "RdBu_r"  # kernels: diverging, centred on zero


def _tile_strip(kernels: np.ndarray, gap: int = 1) -> np.ndarray:
    """`[T, k, k]` → one `[k, T*(k+gap)-gap]` image, each kernel scaled by its own max |w| (so
    every tile spans [−1, 1] and zero is the colour map's centre); gaps are NaN."""
    t, k, _ = kernels.shape
    scale = np.abs(kernels).reshape(t, -1).max(axis=1)
    tiles = kernels / np.where(scale > 0, scale, 1)[:, None, None]
    strip = np.full((k, t * (k + gap) - gap), np.nan)
    for i in range(t):
        strip[:, i * (k + gap):i * (k + gap) + k] = tiles[i]
    return strip


def _kernel_cmap():
    return plt.get_cmap(KERNEL_CMAP).with_extremes(bad="white")  # the gaps between tiles


def draw_kernel(ax, kernel: np.ndarray) -> None:
    """One kernel `[k, k]` on `ax`: diverging colours with vmin = −vmax (zero is white), no
    interpolation, no ticks."""
    v = float(np.abs(kernel).max()) or 1.0
    ax.imshow(kernel, cmap=_kernel_cmap(), vmin=-v, vmax=v, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _interval_runs(labels: dict, codes: np.ndarray) -> list[tuple[int, int, str]]:
    """`(first index, last index, label)` of each labelled interval over the sorted `codes`."""
    out = []
    for iv in labels["intervals"]:
        inside = np.flatnonzero((codes >= iv["start"]) & (codes <= iv["end"]))
        if len(inside):
            out.append((int(inside[0]), int(inside[-1]), iv["label"]))
    return out


def plot_spectrum(kernels: np.ndarray, codes: np.ndarray, path: str, labels: dict | None = None,
                  per_row: int = 50, title: str | None = None,
                  formats: Sequence[str] = ("png",)) -> str:
    """Every decoded kernel along the code axis, `per_row` per row (paper Figs. 3, 31, 32).

    Each row is a strip of kernels with its first and last code on the left and right; under it a
    band coloured by labelled interval, named inside the band where it is wide enough. A legend
    lists every label, so narrow intervals stay readable without overlapping text.

    Args:
      kernels: `[M, k, k]` decoded unit kernels for `codes` `[M]` (sorted, in [0, 1]).
      labels: a labels dict (dwjax.patterns.labels); its intervals are drawn as coloured bands.
    Returns:
      `path` (a `.png`); other `formats` are written beside it.
    """
    kernels, codes = np.asarray(kernels), np.asarray(codes)
    m, k, _ = kernels.shape
    rows = -(-m // per_row)
    step = k + 1
    runs = _interval_runs(labels, codes) if labels else []
    names = list(dict.fromkeys(r[2] for r in sorted(runs)))
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    unit = 0.045  # inches per pixel of the strip
    row_h = (k + (5.4 if labels else 1.2)) * unit
    legend_h = 0.22 * -(-len(names) // 4) + 0.15 if names else 0.0
    fig_w, fig_h = per_row * step * unit + 1.3, rows * row_h + 0.45 + legend_h
    fig, axes = plt.subplots(rows, 1, figsize=(fig_w, fig_h), squeeze=False)
    for r, ax in enumerate(axes[:, 0]):  # explicit positions: rows packed, legend below
        ax.set_position(((0.65) / fig_w, 1 - (0.4 + (r + 1) * row_h) / fig_h,
                         per_row * step * unit / fig_w, row_h / fig_h))
    cmap = _kernel_cmap()
    for r, ax in enumerate(axes[:, 0]):
        a, b = r * per_row, min(m, (r + 1) * per_row)
        strip = _tile_strip(kernels[a:b])
        full = np.full((k, per_row * step - 1), np.nan)
        full[:, :strip.shape[1]] = strip
        ax.imshow(full, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", aspect="auto",
                  extent=(0, full.shape[1], k, 0))
        ax.set_xlim(0, full.shape[1])
        ax.set_ylim(k + (4.1 if labels else 0.2), 0)  # a gap under the band: it belongs above
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.text(-1, k / 2, f"{codes[a]:.3f}", ha="right", va="center", fontsize=7)
        ax.text(strip.shape[1] + 1, k / 2, f"{codes[b - 1]:.3f}", ha="left", va="center",
                fontsize=7)
        if labels:
            for i0, i1, name in runs:
                lo, hi = max(i0, a), min(i1, b - 1)
                if lo > hi:
                    continue
                x0, x1 = (lo - a) * step - 0.5, (hi - a) * step + k + 0.5
                ax.add_patch(plt.Rectangle((x0, k + 0.4), x1 - x0, 2.4, color=colours[name],
                                           clip_on=False))
                if (hi - lo + 1) * step >= len(name) * 1.9:  # room for the name at fontsize 6
                    ax.text((x0 + x1) / 2, k + 1.6, name, ha="center", va="center", fontsize=6)
    if names:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=7,
                   frameon=False, bbox_to_anchor=(0.5, 0.02 / fig_h))
    fig.suptitle(title or f"{m} decoded codes", fontsize=9, y=1 - 0.12 / fig_h, va="top")
    # the colour scale and its sign convention, top right
    cax = fig.add_axes((1 - 1.6 / fig_w, 1 - 0.22 / fig_h, 0.8 / fig_w, 0.07 / fig_h))
    bar = fig.colorbar(plt.cm.ScalarMappable(plt.Normalize(-1, 1), _kernel_cmap()), cax=cax,
                       orientation="horizontal", ticks=[-1, 0, 1])
    bar.ax.tick_params(labelsize=5, length=1, pad=1)
    bar.ax.set_xticklabels(["−max", "0", "+max"])
    bar.ax.set_title("each kernel / its max |w|: red +, blue −", fontsize=5, pad=1)
    return _save(fig, path, formats)


def plot_gallery(groups: dict[str, np.ndarray], path: str, title: str, per_row: int = 8,
                 formats: Sequence[str] = ("png",)) -> str:
    """One row per group: up to `per_row` kernels `[n, k, k]` each (template bank, class samples),
    each scaled by its own max |w| in diverging colours centred on zero."""
    names = list(groups)
    # each row's name above it, left-aligned: wide enough for the longest (7-point text, about
    # 0.065 in a character) and for the kernels
    width = max(per_row * 0.6 + 1.0, 0.065 * max((len(n) for n in names), default=0) + 0.5)
    height = 0.85 * len(names) + 0.5
    fig, axes = plt.subplots(len(names), 1, figsize=(width, height), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        kernels = np.asarray(groups[name])[:per_row]
        ax.imshow(_tile_strip(kernels) if len(kernels) else np.full((1, 1), np.nan),
                  cmap=_kernel_cmap(), vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_title(name, loc="left", fontsize=7, pad=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # the title's own band
    return _save(fig, path, formats)


def save(fig, stem: str, formats: Sequence[str] = ("png",), dpi: int = DPI) -> list[str]:
    """Writes `<stem>.<fmt>` for each format (each via a temporary file, then renamed, so a killed
    run never leaves half a figure); closes `fig`. Returns the paths, in `formats` order."""
    written = []
    try:
        for fmt in dict.fromkeys(formats):  # a repeated format is written once
            path = f"{stem}.{fmt}"
            # No creation date in PDFs: a re-run writes the same bytes.
            meta = {"CreationDate": None} if fmt == "pdf" else {}
            with atomic.atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
            written.append(path)
    finally:
        plt.close(fig)
    return written


def _save(fig, path: str, formats: Sequence[str] = ("png",)) -> str:
    """`save` for a `<stem>.png` path; also writes the other `formats` beside it. Returns `path`."""
    stem, ext = os.path.splitext(path)
    save(fig, stem, [ext[1:], *formats])
    return path
