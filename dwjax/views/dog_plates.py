"""The DoG-family figures: paper Fig. 1 / Figs. 12–13 (DoG and its derivatives, On and Off) and
Fig. 15 (crosses as sums of orthogonal Gaussians), as k×k kernels and as 3-D surfaces.

Every value drawn comes from `dwjax.patterns.templates` (the kernels from `templates.dog`,
`dog_dx`, …, `cross`; the smooth surfaces from `templates.evaluate` on a finer grid), so the
figures show exactly what the labeller and the DoG initialisation use. Panels are built first
(`family_panels`, `cross_panels`: plain arrays a caller can record), then drawn
(`plot_kernel_grid`, `plot_surfaces`).

Colour: a diverging map centred on zero (red > 0, blue < 0), each kernel scaled by its own max |w|;
pixels are drawn with nearest-neighbour interpolation (no blur). The backend is the caller's (see
dwjax/views/plotting.py).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors, image

from dwjax.patterns import templates
from dwjax.views import plotting

CMAP = "RdBu_r"
FORMATS = ("png", "pdf", "svg")
DPI = 110
SMOOTH_STEPS_PER_PIXEL = 8  # fine-grid samples per pixel; the fine grid includes every pixel centre

# (family, kernel function, formula, On class name). Appendix A: 2 first-order and 3 second-order
# derivatives of one DoG; their negations are the Off-Centre ones.
_FAMILY = (
    ("dog", templates.dog, r"$\mathrm{DoG}$", "On-Centre"),
    ("dog_dx", templates.dog_dx, r"$\partial_x \mathrm{DoG}$", "On-Centre 1st derivative (x)"),
    ("dog_dy", templates.dog_dy, r"$\partial_y \mathrm{DoG}$", "On-Centre 1st derivative (y)"),
    ("dog_dxx", templates.dog_dxx, r"$\partial_{xx} \mathrm{DoG}$", "On-Centre 2nd derivative"),
    ("dog_dyy", templates.dog_dyy, r"$\partial_{yy} \mathrm{DoG}$", "On-Centre 2nd derivative"),
    ("dog_dxy", templates.dog_dxy, r"$\partial_{xy} \mathrm{DoG}$", "On-Centre 2nd derivative"),
)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One function drawn two ways: ``pixels [k, k]`` float32 (the kernel) and ``smooth [R, R]``
    float64 (the same function on `smooth_grid(k)`, R = (k−1)·8 + 1)."""

    key: str       # e.g. "On/dog_dx", "cross/0.6": the name it is recorded under
    title: str     # formula and class name, for the figure
    pixels: np.ndarray
    smooth: np.ndarray


def smooth_grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` each ``[R, R]`` float64 pixel offsets over the kernel, R = (k−1)·8 + 1."""
    c = (kernel_size - 1) / 2.0
    t = np.linspace(-c, c, (kernel_size - 1) * SMOOTH_STEPS_PER_PIXEL + 1)
    x, y = np.meshgrid(t, t)  # x along columns, y along rows, as templates.pixel_grid
    return x, y


def family_panels(kernel_size: int, sigma_c: float, sigma_s: float, polarity: str = "On"
                  ) -> list[Panel]:
    """DoG and its derivatives (x, y, xx, yy, xy) as `Panel`s; ``polarity`` "Off" negates them."""
    if polarity not in ("On", "Off"):
        raise ValueError(f"polarity must be 'On' or 'Off', got {polarity!r}")
    sign = 1.0 if polarity == "On" else -1.0
    x, y = smooth_grid(kernel_size)
    panels = []
    for family, kernel_fn, formula, on_name in _FAMILY:
        name = on_name if polarity == "On" else on_name.replace("On-Centre", "Off-Centre")
        panels.append(Panel(
            key=f"{polarity}/{family}",
            title=f"{'−' if sign < 0 else ''}{formula}\n{name}",
            pixels=sign * kernel_fn(kernel_size, sigma_c, sigma_s),
            smooth=sign * templates.evaluate(family, x, y, sigma_c, sigma_s)))
    return panels


def cross_panels(kernel_size: int, sigmas: Sequence[float]) -> list[Panel]:
    """On-Centre Cross ``exp(−x²/2σ²) + exp(−y²/2σ²)`` (appendix B) for each σ, as `Panel`s."""
    x, y = smooth_grid(kernel_size)
    return [Panel(key=f"cross/{s:g}", title=f"σ = {s:g}", pixels=templates.cross(kernel_size, s),
                  smooth=templates.evaluate("cross", x, y, sigma=s)) for s in sigmas]


# ------------------------------------------------------------------------------------------ drawing


def _vmax(*arrays: np.ndarray) -> float:
    m = max(float(np.abs(a).max()) for a in arrays)
    return m if m > 0 else 1.0


def _draw_kernel(ax, kernel: np.ndarray) -> image.AxesImage:
    """``[k, k]`` kernel as pixels, colours centred on 0, vmax = its max |w|; axes in pixels."""
    k = kernel.shape[0]
    vmax = _vmax(kernel)
    c = (k - 1) / 2.0
    im = ax.imshow(kernel, cmap=CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest",
                   extent=(-c - 0.5, c + 0.5, c + 0.5, -c - 0.5))  # axes in pixel offsets (x, y)
    ticks = [-int(c), 0, int(c)]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=7, length=2)
    return im


def _colorbar(fig, axes, label: str) -> None:
    sm = plt.cm.ScalarMappable(norm=colors.Normalize(-1, 1), cmap=CMAP)
    cb = fig.colorbar(sm, ax=axes, fraction=0.025, pad=0.02, ticks=[-1, 0, 1])
    cb.ax.set_yticklabels(["−max|w|", "0", "+max|w|"], fontsize=7)
    cb.set_label(label, fontsize=8)


def plot_kernel_grid(rows: dict[str, list[Panel]], stem: str, formats: Sequence[str], title: str
                     ) -> list[str]:
    """One row of k×k kernels per entry of ``rows`` (row label → panels); returns written paths."""
    labels = list(rows)
    ncol = max(len(p) for p in rows.values())
    fig, axes = plt.subplots(len(labels), ncol, figsize=(2.0 * ncol + 1.6, 2.3 * len(labels) + 0.7),
                             squeeze=False, layout="constrained")
    for r, label in enumerate(labels):
        for c in range(ncol):
            ax = axes[r, c]
            if c >= len(rows[label]):
                ax.axis("off")
                continue
            panel = rows[label][c]
            _draw_kernel(ax, panel.pixels)
            ax.set_title(panel.title, fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=10, fontweight="bold")
    _colorbar(fig, axes, "weight (each kernel scaled by its max |w|)")
    fig.suptitle(title, fontsize=11)
    return save(fig, stem, formats)


def _surface(ax, k: int, z: np.ndarray, vmax: float, zlim: tuple[float, float], title: str) -> None:
    """``z [R, R]`` on `smooth_grid(k)` as a 3-D surface, zero-centred colours."""
    x, y = smooth_grid(k)
    # Rasterized in vector formats: a PDF of ~1,000 facets per surface is slow to write and view.
    ax.plot_surface(x, y, z, cmap=CMAP, norm=colors.Normalize(-vmax, vmax), rstride=1, cstride=1,
                    linewidth=0, antialiased=False, rasterized=True)
    _style_3d(ax, k, zlim, title)


def _bars(ax, kernel: np.ndarray, vmax: float, zlim: tuple[float, float]) -> None:
    """``[k, k]`` kernel as one bar per pixel, from 0 to its value (the kernel a network holds)."""
    x, y = templates.pixel_grid(kernel.shape[0])
    v = kernel.ravel().astype(np.float64)
    w = 0.8
    cmap = plt.get_cmap(CMAP)
    ax.bar3d(x.ravel() - w / 2, y.ravel() - w / 2, np.minimum(v, 0), w, w, np.abs(v),
             color=cmap(colors.Normalize(-vmax, vmax)(v)), shade=True, linewidth=0, rasterized=True)
    _style_3d(ax, kernel.shape[0], zlim, None)


def _style_3d(ax, k: int, zlim: tuple[float, float], title: str | None) -> None:
    ax.set_zlim(*zlim)
    c = (k - 1) // 2
    ax.set_xticks([-c, 0, c])  # as the 2-D panels: integer pixel offsets, no crowding at k = 5
    ax.set_yticks([-c, 0, c])
    ax.invert_yaxis()  # y (row) grows towards the viewer, as the top of a 2-D image is "far"
    ax.set_xlabel("x", fontsize=7, labelpad=-10)
    ax.set_ylabel("y", fontsize=7, labelpad=-10)
    ax.tick_params(labelsize=5, pad=-3)
    ax.set_zticks([])
    ax.view_init(elev=28, azim=-55)
    if title:
        ax.set_title(title, fontsize=8)


def plot_surfaces(panels: Sequence[Panel], stem: str, formats: Sequence[str], title: str
                  ) -> list[str]:
    """One column per panel: the smooth function as a 3-D surface, the k×k kernel as 3-D bars, and
    the k×k kernel as a 2-D image (the paper's Fig. 1 pairs 3-D and 2-D plots). Returns paths."""
    n = len(panels)
    k = panels[0].pixels.shape[0]
    fig = plt.figure(figsize=(2.6 * n + 1.4, 7.6), layout="constrained")
    grid = fig.add_gridspec(3, n, height_ratios=(1.15, 1.15, 1.0))
    flat = []
    for c, p in enumerate(panels):
        # One colour scale and one z range (data and 0) for the function and its kernel.
        vmax = _vmax(p.smooth, p.pixels)
        zlim = (min(0.0, float(p.smooth.min()), float(p.pixels.min())),
                max(0.0, float(p.smooth.max()), float(p.pixels.max())))
        _surface(fig.add_subplot(grid[0, c], projection="3d"), k, p.smooth, vmax, zlim, p.title)
        _bars(fig.add_subplot(grid[1, c], projection="3d"), p.pixels, vmax, zlim)
        ax = fig.add_subplot(grid[2, c])
        _draw_kernel(ax, p.pixels)
        flat.append(ax)
    for row, text in enumerate(("continuous\nfunction", f"{k}×{k} kernel\n(3-D)",
                                f"{k}×{k} kernel")):
        fig.text(0.003, 1 - (row + 0.5) / 3.1, text, fontsize=9, fontweight="bold",
                 rotation=90, ha="left", va="center")
    _colorbar(fig, flat, "weight / max |w|")
    fig.suptitle(title, fontsize=11)
    return save(fig, stem, formats)


def save(fig, stem: str, formats: Sequence[str]) -> list[str]:
    """`plotting.save` at this module's resolution (one implementation for every figure)."""
    return plotting.save(fig, stem, formats, dpi=DPI)
