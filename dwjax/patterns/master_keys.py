"""Master key filters: a small bank of k×k filters every depthwise kernel is fitted to.

The "master key filters" hypothesis (Babaiee, Kiasari, Rus & Grosu, AAAI 2025; NeurIPS 2025):
decode a trained autoencoder's spectrum at a few dozen evenly spaced codes, keep a handful of them
chosen greedily, and every depthwise kernel is, up to an affine map, one of them. Lindeberg,
Babaiee & Kiasari (JMIV 2026, `tonylindeberg/masterfiltmodel`) fit each kernel y to a unit,
centred filter x as y ≈ a·x + b = (y_c·x)·x + mean(y).

The fit, for a bank of unit centred filters x_j `[K, k*k]` and a kernel y (y_c = y − mean y):
j* = argmax_j |y_c·x_j| (sign-free: the residual ‖y − a·x_j − b‖² = ‖y_c‖² − (y_c·x_j)² is
smallest there; ties go to the lower index), scale a = y_c·x_j*, offset b = mean(y), and the
explained fraction r2 = a² / ‖y_c‖² (1 = exact). Everything is computed in float64 on the host
(K is small: a GEMM `[N, k*k] @ [k*k, K]`) and rounded once to float32.

Dead kernels (`preprocess.valid_mask`, the rule of every path) have no pattern: filter −1, scale
and r2 NaN, offset their mean. Their replacement (`rebuild`) is that constant.

Greedy selection: each step adds the candidate that most raises the mean explained fraction
(each kernel's best r2 over the bank so far) over a sample of live kernels; the mean after each
step is the coverage curve.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dwjax.model import preprocess

DEAD = -1


@dataclasses.dataclass
class Fit:
    """Each kernel's best filter and affine map, every field `[N]`.

    Attributes:
      filter: int32 index into the bank, −1 for a dead kernel.
      scale: float32 a = y_c·x_filter (signed); NaN when dead.
      offset: float32 b = mean(y).
      r2: float32 explained fraction (y_c·x)² / ‖y_c‖² in [0, 1]; NaN when dead.
    """
    filter: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    r2: np.ndarray

    def layer_parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(index [N] int32, scale [N] float32, offset [N] float32)` of a frozen layer: a dead
        kernel becomes filter 0 at scale 0, i.e. its constant mean (what `rebuild` writes)."""
        dead = self.filter < 0
        return (np.where(dead, 0, self.filter).astype(np.int32),
                np.where(dead, 0.0, self.scale).astype(np.float32), self.offset.astype(np.float32))


def unit_filters(filters) -> np.ndarray:
    """`[K, k, k]` or `[K, k*k]` → `[K, k*k]` float64 filters, centred and of unit length.

    Raises ValueError for a constant (or non-finite) filter: it has no direction.
    """
    f = np.asarray(filters, np.float64).reshape(len(filters), -1)
    c = f - f.mean(axis=1, keepdims=True)
    n = np.linalg.norm(c, axis=1, keepdims=True)
    bad = ~np.isfinite(n[:, 0]) | (n[:, 0] <= 1e-12 * np.maximum(np.abs(f).max(axis=1), 1e-300))
    if bad.any():
        raise ValueError(f"filter {int(np.flatnonzero(bad)[0]) + 1} is constant or not finite")
    return c / n


def candidates_from_coords(coords: np.ndarray, kernel_size: int) -> np.ndarray:
    """Decoder outputs `[M, k*k-1]` (hyperplane coordinates) → `[M', k*k]` unit centred candidate
    filters, float64; an output with no direction (a degenerate decoder's) is dropped."""
    pixels = np.asarray(coords, np.float64) @ preprocess._basis_np(kernel_size).T
    n = np.linalg.norm(pixels, axis=1)
    keep = n > 1e-9
    return pixels[keep] / n[keep, None]


def unit_kernels(kernels) -> tuple[np.ndarray, np.ndarray]:
    """`[N, k, k]` raw kernels → `(units [N, k*k] float64, live [N] bool)`: centred, unit length
    (dead rows zero)."""
    y = np.asarray(kernels, np.float64).reshape(len(kernels), -1)
    live = preprocess.valid_mask(y)
    c = y - y.mean(axis=1, keepdims=True)
    n = np.linalg.norm(c, axis=1, keepdims=True)
    return np.where(live[:, None], c / np.where(n > 0, n, 1.0), 0.0), live


def explained(units: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """`[N, K]`: the fraction of each unit kernel `[N, d]` explained by each bank filter `[K, d]`
    alone, (u·x)²."""
    return np.square(units @ np.asarray(bank, np.float64).T)


def coverage(units: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """`[K]`: the mean explained fraction of the units by the first 1, 2, …, K filters of `bank`
    (each unit takes its best filter among them)."""
    if not len(units):
        return np.zeros(len(bank))
    return np.maximum.accumulate(explained(units, bank), axis=1).mean(axis=0)


@dataclasses.dataclass
class Selection:
    """A greedy selection: `order [n]` indices into the candidates, in the order chosen, and
    `coverage [n]` the mean explained fraction after each step."""
    order: np.ndarray
    coverage: np.ndarray


def greedy_select(units: np.ndarray, candidates: np.ndarray, n: int,
                  chunk: int = 65_536) -> Selection:
    """Chooses `n` of `candidates [M, d]` one at a time, each the one that most raises the mean
    explained fraction of `units [N, d]` (live kernels, centred and unit) given those already
    chosen; ties go to the lower index.

    Args:
      units: the kernels the choice is judged on (a bounded sample of a job's kernels).
      n: how many to choose, ≤ M.
      chunk: kernels per block (memory O(chunk·M)).
    """
    m = len(candidates)
    if not 1 <= n <= m:
        raise ValueError(f"cannot choose {n} of {m} candidates")
    best = np.zeros(len(units))
    order: list[int] = []
    curve = []
    for _ in range(n):
        gain = np.zeros(m)
        for a in range(0, len(units), chunk):
            g = explained(units[a:a + chunk], candidates)
            gain += np.maximum(best[a:a + chunk, None], g).sum(axis=0)
        gain[order] = -np.inf
        j = int(np.argmax(gain))
        order.append(j)
        best = np.maximum(best, explained(units, candidates[j:j + 1])[:, 0])
        curve.append(best.mean() if len(best) else 0.0)
    return Selection(np.asarray(order, np.int64), np.asarray(curve))


def principal_filters(units: np.ndarray, n: int) -> np.ndarray:
    """`[n, d]` the leading eigenvectors of the units' second moment Σ u uᵀ (PCA without removing
    the mean: a kernel and its negative are the same pattern to a sign-free fit)."""
    _, vecs = np.linalg.eigh(units.T @ units)
    return vecs[:, ::-1][:, :n].T.copy()


def subspace_coverage(units: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """`[n]`: the mean fraction of the units explained by the span of the first 1, …, n
    orthonormal `basis` rows (any linear combination of them: a ceiling for n single filters)."""
    if not len(units):
        return np.zeros(len(basis))
    return np.cumsum(explained(units, basis), axis=1).mean(axis=0)


def fit(kernels, bank: np.ndarray) -> Fit:
    """Fits each raw kernel `[N, k, k]` to its best filter of `bank` `[K, k*k]` or `[K, k, k]`
    (unit, centred: `unit_filters`); see the module doc."""
    y = np.asarray(kernels, np.float64).reshape(len(kernels), -1)
    bank = np.asarray(bank, np.float64).reshape(len(bank), -1)
    live = preprocess.valid_mask(y)
    b = y.mean(axis=1)
    yc = y - b[:, None]
    proj = yc @ bank.T
    j = np.argmax(np.abs(proj), axis=1) if len(y) else np.zeros(0, np.int64)
    a = np.take_along_axis(proj, j[:, None], axis=1)[:, 0] if len(y) else np.zeros(0)
    energy = np.sum(yc * yc, axis=1)
    r2 = np.minimum(a * a / np.where(live, energy, 1.0), 1.0)
    return Fit(np.where(live, j, DEAD).astype(np.int32),
               np.where(live, a, np.nan).astype(np.float32), b.astype(np.float32),
               np.where(live, r2, np.nan).astype(np.float32))


def rebuild(bank: np.ndarray, index: np.ndarray, scale: np.ndarray,
            offset: np.ndarray) -> np.ndarray:
    """`[N, k, k]` float32 kernels scale·bank[index] + offset, in float32 arithmetic (one rounding
    per operation), exactly as a frozen master-key layer computes its kernel.

    Args:
      bank: `[K, k, k]` (or `[K, k*k]`) filters, rounded to float32 here.
      index, scale, offset: `[N]`, as `Fit.layer_parameters` gives them.
    """
    b = np.asarray(bank, np.float32)
    k = int(round(np.sqrt(b[0].size)))
    b = b.reshape(len(b), k, k)
    s = np.asarray(scale, np.float32)[:, None, None]
    o = np.asarray(offset, np.float32)[:, None, None]
    return (s * b[np.asarray(index)]) + o


def replaced_kernels(kernels, bank: np.ndarray) -> np.ndarray:
    """`[N, k, k]` float32: each kernel replaced by its fit a·x_j + b (`fit`, then `rebuild`); a
    dead kernel by its mean. The bank is taken as float32 (what bank.npy and a frozen layer
    hold), for the fit too, so every route computes the same scales."""
    bank = np.asarray(bank, np.float32)
    return rebuild(bank, *fit(kernels, bank).layer_parameters())
