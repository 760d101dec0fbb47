"""Idealised discrete scale-space filters: a bank of master key filters from first principles.

Lindeberg, Babaiee & Kiasari (JMIV 2026) model the 8 master key filters of ConvNeXtV2-tiny as
discrete scale-space filters: the separable discrete analogue of the Gaussian,
T(m, n; σx, σy) = T1(n; σx) T1(m; σy) with T1(n; σ) = e^(−σ²) I_n(σ²) (I_n the modified Bessel
function of integer order; variance σ²), truncated to k taps and normalised to sum 1, under a
difference operator. x runs along a kernel's columns, y along its rows (downwards).

Operators (one per filter, with its own (σx, σy)):

    T                  the smoothing kernel itself
    dx, dy             central difference (f[n+1] − f[n−1]) / 2, one-sided at the border
    dx+, dx-, dy+, dy- forward / backward difference, zero where it would leave the kernel
    dxx, dyy, dxy      second differences (1, −2, 1) and δx δy; zero on the border
    lap                the five-point Laplacian δxx + δyy; zero on the border
    T-<γ>lap           T − γ ∇²₅ T (a sharpened centre, e.g. `T-0.5lap`)

A spec is `op σx σy` entries separated by `;`, e.g. `"dx 1.107 0.945; T 0.609 0.601"`, or a preset
name (`PRESETS`). Each filter is scaled to unit Frobenius norm here; the fit centres it
(`master_keys.unit_filters`).
"""
from __future__ import annotations

import re

import numpy as np

# Lindeberg, Babaiee & Kiasari (JMIV 2026), their "method B" parameters for the 8 filters of
# ConvNeXtV2-tiny (7×7), in their order.
PRESETS = {
    "lindeberg_b": ("dy+ 0.644 0.583; dx- 0.586 0.644; dy- 0.690 0.674; dx+ 0.756 0.460; "
                    "dx 1.107 0.945; dy 0.900 0.889; T-0.5lap 0.675 0.675; T 0.609 0.601"),
}
OPERATORS = ("T", "dx", "dy", "dx+", "dx-", "dy+", "dy-", "dxx", "dyy", "dxy", "lap")
_SHARPEN = re.compile(r"^T-(\d+(?:\.\d*)?|\.\d+)lap$")


def discrete_gaussian(sigma: float, size: int) -> np.ndarray:
    """`[size]` float64: T1(n; σ) for n = −(size−1)/2 … (size−1)/2 (an even size is centred
    between the middle taps' left one), normalised to sum 1; σ = 0 is a unit impulse."""
    from scipy import special

    n = np.arange(size) - (size - 1) // 2
    if sigma <= 0:
        return (n == 0).astype(np.float64)
    t = special.ive(np.abs(n), sigma * sigma)  # e^(−σ²) I_|n|(σ²), without overflow
    return t / t.sum()


def _diff(f: np.ndarray, axis: int, kind: str) -> np.ndarray:
    """A first difference of `f` along `axis` (1: x, columns; 0: y, rows)."""
    g = np.moveaxis(f, axis, 1)
    out = np.zeros_like(g)
    if kind == "+":
        out[:, :-1] = g[:, 1:] - g[:, :-1]
    elif kind == "-":
        out[:, 1:] = g[:, 1:] - g[:, :-1]
    else:  # central, one-sided at the border so no row or column is left zero
        out[:, 1:-1] = (g[:, 2:] - g[:, :-2]) / 2
        out[:, 0] = g[:, 1] - g[:, 0]
        out[:, -1] = g[:, -1] - g[:, -2]
    return np.moveaxis(out, 1, axis)


def _second(f: np.ndarray, op: str) -> np.ndarray:
    """δxx, δyy, δxy or the five-point Laplacian of `f`, on the interior (zero on the border)."""
    out = np.zeros_like(f)
    c = f[1:-1, 1:-1]
    xx = f[1:-1, 2:] - 2 * c + f[1:-1, :-2]
    yy = f[2:, 1:-1] - 2 * c + f[:-2, 1:-1]
    xy = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / 4
    out[1:-1, 1:-1] = {"dxx": xx, "dyy": yy, "dxy": xy, "lap": xx + yy}[op]
    return out


def filter_kernel(op: str, sigma_x: float, sigma_y: float, size: int) -> np.ndarray:
    """One `[size, size]` float64 filter of unit Frobenius norm (see the module doc)."""
    t = np.outer(discrete_gaussian(sigma_y, size), discrete_gaussian(sigma_x, size))
    sharpen = _SHARPEN.match(op)
    if sharpen:
        f = t - float(sharpen.group(1)) * _second(t, "lap")
    elif op == "T":
        f = t
    elif op in ("dx", "dx+", "dx-", "dy", "dy+", "dy-"):
        f = _diff(t, 1 if op[1] == "x" else 0, op[2:])
    elif op in ("dxx", "dyy", "dxy", "lap"):
        f = _second(t, op)
    else:
        raise ValueError(f"unknown operator {op!r} (known: {', '.join(OPERATORS)}, T-<γ>lap)")
    n = np.linalg.norm(f)
    return f / n if n > 0 else f


def parse_spec(spec: str) -> list[tuple[str, float, float]]:
    """`"op σx σy; …"` (or a `PRESETS` name) → `[(op, σx, σy), …]`; ValueError naming the bad
    entry."""
    text = PRESETS.get(spec.strip(), spec)
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        parts = entry.split()
        if len(parts) != 3:
            raise ValueError(f"{entry!r}: expected 'op sigma_x sigma_y'")
        op = parts[0]
        if op not in OPERATORS and not _SHARPEN.match(op):
            raise ValueError(f"{entry!r}: unknown operator {op!r} (known: "
                             f"{', '.join(OPERATORS)}, T-<γ>lap)")
        try:
            sx, sy = float(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"{entry!r}: the scales must be numbers")
        if not (np.isfinite(sx) and np.isfinite(sy) and sx >= 0 and sy >= 0):
            raise ValueError(f"{entry!r}: the scales must be finite and ≥ 0")
        out.append((op, sx, sy))
    if not out:
        raise ValueError("no filters in the spec")
    return out


def bank(spec: str, size: int) -> np.ndarray:
    """`[K, size, size]` float64: the filters of a spec (or preset), in its order."""
    return np.stack([filter_kernel(op, sx, sy, size) for op, sx, sy in parse_spec(spec)])
