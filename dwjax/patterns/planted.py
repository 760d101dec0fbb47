"""Planted-class kernels: DoG-family kernels whose class is known, to measure a labeller against.

Every kernel is drawn from one of the paper's families (dwjax.patterns.family_fit renders them) at
random scale, pose and noise: On/Off-Centre DoG (slightly elongated, any orientation), 1st
derivatives at any angle (named by their bright lobe, as the labeller names them), 2nd derivatives
(a line at any angle, or ∂²/∂x∂y turned by up to 30°), On/Off crosses (sums of two orthogonal
Gaussian ridges, turned) and, for 5×5, On/Off squares (centred or shifted towards a corner). Class
shares are unbalanced as in real networks (`DEFAULT_SHARES`). Each kernel gets Gaussian pixel noise
relative to its own RMS, then a random positive scale and offset (which the centred cosine ignores).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from dwjax.patterns import family_fit, templates

FIRST = "1st derivative"  # the four subtypes together: the angle decides which one
# Shares of the clustered kernels, roughly as the labelled README job (EfficientNet-Lite, 5×5) and
# the paper's Fig. 7 (ConvNeXt-V2, 7×7: more crosses) report them.
DEFAULT_SHARES: dict[int, dict[str, float]] = {
    5: {"On-Centre": 0.36, "Off-Centre": 0.14, FIRST: 0.22, "On-Centre 2nd derivative": 0.05,
        "Off-Centre 2nd derivative": 0.03, "On-Centre Cross": 0.04, "Off-Centre Cross": 0.03,
        "On-Square": 0.08, "Off-Square": 0.05},
    7: {"On-Centre": 0.30, "Off-Centre": 0.20, FIRST: 0.18, "On-Centre 2nd derivative": 0.05,
        "Off-Centre 2nd derivative": 0.03, "On-Centre Cross": 0.13, "Off-Centre Cross": 0.11},
}
# Largest centre offset per axis (px): real kernels sit up to about half a pixel off-centre.
MAX_OFFSET = 0.5


@dataclasses.dataclass
class Planted:
    """Planted kernels and their truth.

    Attributes:
      kernels: ``[n, k, k]`` float32, noisy, random positive scale and offset.
      clean: ``[n, k, k]`` float32, the same without noise (centred, unit norm).
      names: ``[n]`` str, the class name (``templates.class_names(k)``).
      family: ``[n]`` str, the `family_fit.FAMILIES` key drawn.
    """

    kernels: np.ndarray
    clean: np.ndarray
    names: np.ndarray
    family: np.ndarray


def default_shares(kernel_size: int) -> dict[str, float]:
    """`DEFAULT_SHARES` for k (7×7's for any k without squares)."""
    return dict(DEFAULT_SHARES[5 if kernel_size in templates.SQUARE_KERNEL_SIZES else 7])


def _counts(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Exact counts summing to n (largest remainder)."""
    p = np.asarray(list(shares.values()), np.float64)
    raw = p / p.sum() * n
    c = np.floor(raw).astype(np.int64)
    c[np.argsort(-(raw - c), kind="stable")[: n - c.sum()]] += 1
    return dict(zip(shares, c.tolist()))


def _sigma_hi(k: int) -> float:
    """Largest planted centre σ: a centre lobe that still leaves room for its surround."""
    return 0.25 * (k - 1) + 0.2


def _draw(group: str, m: int, k: int, rng: np.random.Generator) -> list[tuple[str, dict,
                                                                           np.ndarray]]:
    """``[(family, params, sign [m_i]), …]`` for m kernels of one planted group."""
    off = lambda: rng.uniform(-MAX_OFFSET, MAX_OFFSET, m)  # noqa: E731
    logu = lambda lo, hi: np.exp(rng.uniform(np.log(lo), np.log(hi), m))  # noqa: E731
    on = 1.0 if group.startswith("On") else -1.0
    if group in ("On-Centre", "Off-Centre"):
        p = dict(sigma=logu(0.5, _sigma_hi(k)), ratio=rng.uniform(1.6, 4.0, m),
                 elong=rng.uniform(1.0, 1.5, m), theta=rng.uniform(0, np.pi, m),
                 shift=np.zeros(m), x0=off(), y0=off())
        return [("dog", p, np.full(m, on))]
    if group == FIRST:
        angle = rng.uniform(0, 2 * np.pi, m)  # direction of +u; the sign picks either half turn
        p = dict(sigma=logu(0.6, _sigma_hi(k)), ratio=rng.uniform(1.6, 4.0, m),
                 elong=rng.uniform(1.0, 1.8, m), theta=np.mod(angle, np.pi), x0=off(), y0=off())
        return [("d1", p, np.where(angle < np.pi, 1.0, -1.0))]
    if group.endswith("2nd derivative"):
        # Three in four a line (∂²/∂u², any angle), the rest ∂²/∂x∂y turned by up to 30° (its
        # On/Off flips at 45°, where it is its own negative turned by 90°).
        lines = rng.random(m) < 0.75
        p = dict(sigma=logu(0.6, _sigma_hi(k)), ratio=rng.uniform(1.6, 4.0, m),
                 elong=np.where(lines, rng.uniform(1.0, 2.0, m), 1.0),
                 theta=np.where(lines, rng.uniform(0, np.pi, m),
                                rng.uniform(-np.pi / 6, np.pi / 6, m)), x0=off(), y0=off())
        return [(fam, {c: v[mask] for c, v in p.items()}, np.full(mask.sum(), on))
                for fam, mask in (("d2", lines), ("dxy", ~lines)) if mask.any()]
    if group.endswith("Cross"):
        p = dict(sigma=logu(0.4, 0.12 * (k - 1) + 0.15), theta=rng.uniform(0, np.pi / 2, m),
                 x0=off(), y0=off())
        return [("cross", p, np.full(m, on))]
    if group.endswith("Square"):
        # Paper §5 / `templates.square`: a block of whole pixels towards the upper-left or
        # bottom-right corner, half a pixel (even sizes) or one pixel off-centre, or one pixel
        # further into the corner; a fifth of the odd sizes centred.
        size = rng.integers(2, k, m).astype(np.float64)
        centred = (rng.random(m) < 0.2) & (size % 2 == 1)
        corner = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        step = np.where(size % 2 == 0, 0.5, 1.0) + np.where(rng.random(m) < 0.5, 0.0, 1.0)
        step = np.minimum(step, (k - size) / 2)  # the block stays inside the kernel
        shift = np.where(centred, 0.0, corner * step)
        jitter = lambda: rng.uniform(-0.15, 0.15, m)  # noqa: E731
        p = dict(size=size, blur=rng.uniform(0.2, 0.45, m), theta=np.zeros(m),
                 x0=shift + jitter(), y0=shift + jitter())
        return [("square", p, np.full(m, on))]
    raise ValueError(f"unknown planted group {group!r}")


def plant(n: int, kernel_size: int, rng, noise: float = 0.1,
          shares: Mapping[str, float] | None = None) -> Planted:
    """``n`` planted kernels of size k (see the module doc), shuffled.

    Args:
      rng: a `np.random.Generator` or an int seed.
      noise: pixel noise std relative to the clean kernel's RMS (0.1: amplitude SNR 10).
      shares: group → share (keys: class names, or "1st derivative" for the four subtypes
        together); default `default_shares(k)`. Squares only where ``class_names(k)`` has them.
    """
    rng = np.random.default_rng(rng)
    k = kernel_size
    names_k = templates.class_names(k)
    shares = default_shares(k) if shares is None else dict(shares)
    for g in shares:
        if g != FIRST and g not in names_k:
            raise ValueError(f"unknown planted group {g!r} for kernel_size {k}")
    kernels, names, fams = [], [], []
    for group, m in _counts(n, shares).items():
        if m == 0:
            continue
        for fam, p, sign in _draw(group, m, k, rng):
            kernels.append(family_fit.render(fam, k, p) * sign[:, None, None])
            on_name = family_fit.name_of(fam, 1, p["theta"], k)
            off_name = family_fit.name_of(fam, -1, p["theta"], k)
            names.append(np.asarray(names_k, dtype=object)[np.where(sign > 0, on_name, off_name)])
            fams.append(np.full(len(sign), fam))
    clean = np.concatenate(kernels)
    clean = clean - clean.mean(axis=(1, 2), keepdims=True)
    clean /= np.linalg.norm(clean.reshape(len(clean), -1), axis=1)[:, None, None]
    # Unit norm: a pixel's RMS is 1/k.
    noisy = clean + rng.normal(size=clean.shape) * noise / k
    scale = np.exp(rng.uniform(np.log(0.1), np.log(3.0), len(clean)))[:, None, None]
    dc = rng.normal(size=(len(clean), 1, 1)) * 0.5 / k
    order = rng.permutation(len(clean))
    return Planted(((noisy + dc) * scale)[order].astype(np.float32),
                   clean[order].astype(np.float32),
                   np.concatenate(names)[order].astype(str), np.concatenate(fams)[order])
