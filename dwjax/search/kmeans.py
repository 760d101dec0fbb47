"""The paper's 3×3 path (§5, "Models with 3×3 kernels"): k-means, 10 clusters, min-max-encoded
kernels.

    x = minmax_encode(kernels)[valid]          # [n, 9] in [0, 1], constant kernels dropped
    centroids, inertia = fit_kmeans(x, 10)     # k-means++ (seeded) then jitted Lloyd iterations
    cluster, distance = assign_kmeans(x, centroids)

Distances are Euclidean in min-max space. Everything is deterministic for a seed: k-means++ samples
with the Gumbel-max trick from `jax.random.key(seed)` (no float cumsum over N), the Lloyd sums are
chunked in a fixed order, and the fitted clusters are put in a canonical order (size descending,
ties by centroid lexicographic) so cluster ids are stable across runs.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dwjax.io import shards
from dwjax.model import preprocess

DEFAULT_CHUNK = 65536


def minmax_encode(kernels) -> np.ndarray:
    """`[N, 3, 3]` (any k×k) → `[N, k*k]` float32, each kernel scaled to [0, 1] by its own min and
    max.

    Dead kernels (preprocess.valid_mask False: constant, so max == min) become all-zero rows; drop
    them with `encode_valid` or `x[preprocess.valid_mask(kernels)]` before fitting.
    """
    flat = np.asarray(kernels, np.float64).reshape(len(kernels), -1)
    lo = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - lo
    valid = preprocess.valid_mask(flat)
    out = (flat - lo) / np.where(valid[:, None] & (span > 0), span, 1.0)
    out[~valid] = 0.0
    return out.astype(np.float32)


def encode_valid(kernels) -> tuple[np.ndarray, np.ndarray]:
    """`[N, k, k]` → `(x [n_valid, k*k] min-max codes, valid [N] bool)`: the dead kernels
    dropped."""
    valid = preprocess.valid_mask(kernels)
    return minmax_encode(kernels)[valid], valid


def sample_valid(arrays: Sequence, max_fit: int, seed: int,
                 chunk_size: int = DEFAULT_CHUNK,
                 encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = encode_valid,
                 ) -> np.ndarray:
    """The codes `[n, D]` (`encode`; default the min-max codes, D = k*k) of up to `max_fit` live
    kernels of `arrays` (each `[N_i, k, k]`, e.g. memory-mapped shards), read `chunk_size` rows at
    a time: memory O(max_fit + chunk), not O(ΣN_i).

    The same rows as `encode` of all arrays concatenated, then (when more than `max_fit`) the
    sorted draw `default_rng(seed).choice(n, max_fit, replace=False)`: one pass counts the live
    kernels, a second gathers the drawn ones. `encode` maps `[m, k, k]` to `(codes of the live
    ones, live mask [m])`, as `encode_valid` does.
    """
    def chunks():
        for a in arrays:
            for start in range(0, len(a), chunk_size):
                yield a, start, min(start + chunk_size, len(a))

    n = 0
    for a, start, stop in chunks():
        n += int(preprocess.valid_mask(a[start:stop]).sum())
        shards.release_pages(a, start, stop)
    pick = (np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))
            if n > max_fit else None)
    out, offset = [], 0
    for a, start, stop in chunks():
        x, _ = encode(a[start:stop])
        shards.release_pages(a, start, stop)
        m = len(x)
        if pick is not None:
            lo, hi = np.searchsorted(pick, [offset, offset + m])
            x = x[pick[lo:hi] - offset]
        offset += m
        out.append(x)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- pure jit-able pieces

def _sq_dist(x, c):
    """`[n, D]`, `[K, D]` → `[n, K]` squared distances, computed as Σ(x−c)² (no ‖x‖²−2x·c+‖c‖²
    cancellation; D is 9 here so the `[n, K, D]` intermediate is small per chunk)."""
    return jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)


def _chunked(x, chunk: int):
    """`[N, D]` → (`[B, chunk, D]` zero-padded, `[B, chunk]` weights 1 for real rows, 0 for
    pads)."""
    n = x.shape[0]
    pad = (-n) % chunk
    w = jnp.concatenate([jnp.ones((n,), x.dtype), jnp.zeros((pad,), x.dtype)])
    xp = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)])
    return xp.reshape(-1, chunk, x.shape[1]), w.reshape(-1, chunk)


def _lloyd_stats(xb, wb, centroids):
    """One pass over chunks: per-cluster sums `[K, D]`, counts `[K]`, inertia (at `centroids`)."""
    k, d = centroids.shape

    def body(carry, xw):
        sums, counts, inertia = carry
        x, w = xw
        d2 = _sq_dist(x, centroids)
        a = jnp.argmin(d2, axis=1)
        onehot = jax.nn.one_hot(a, k, dtype=x.dtype) * w[:, None]
        sums = sums + jnp.matmul(onehot.T, x, precision=preprocess.PRECISION)
        return (sums, counts + onehot.sum(0), inertia + jnp.sum(jnp.min(d2, axis=1) * w)), None

    init = (jnp.zeros((k, d), xb.dtype), jnp.zeros((k,), xb.dtype), jnp.zeros((), xb.dtype))
    return lax.scan(body, init, (xb, wb))[0]


@functools.partial(jax.jit, static_argnames=("n_clusters",))
def _kmeans_pp(x, key, n_clusters: int):
    """k-means++ seeding: `[N, D]` → `[K, D]`. Each next centre is drawn with probability ∝ D²
    (squared distance to the nearest chosen centre) by Gumbel-max: argmax(log D² + Gumbel). Points
    already chosen have D² = 0 → log 0 = −inf, so centres are distinct when x has ≥ K distinct
    rows."""
    n = x.shape[0]
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (), 0, n)
    cents = jnp.zeros((n_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum(jnp.square(x - x[first]), axis=1)

    def body(i, carry):
        cents, d2, key = carry
        key, sub = jax.random.split(key)
        g = jax.random.gumbel(sub, (n,), x.dtype)
        j = jnp.argmax(jnp.log(d2) + g)
        c = x[j]
        return cents.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=1)), key

    return lax.fori_loop(1, n_clusters, body, (cents, d2, key))[0]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _lloyd(x, init, max_iter, tol, chunk: int):
    """Lloyd iterations until the total squared centre shift ≤ tol·mean(var(x)) or max_iter.

    An empty cluster keeps its previous centroid. Returns `(centroids [K, D], n_iter)`.
    """
    xb, wb = _chunked(x, chunk)
    thresh = tol * jnp.mean(jnp.var(x, axis=0))

    def cond(s):
        _, it, shift = s
        return (it < max_iter) & (shift > thresh)

    def body(s):
        c, it, _ = s
        sums, counts, _ = _lloyd_stats(xb, wb, c)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
        return new, it + 1, jnp.sum(jnp.square(new - c))

    c, it, _ = lax.while_loop(cond, body, (init, jnp.int32(0), jnp.float32(jnp.inf)))
    return c, it


@jax.jit
def _assign_block(x, centroids):
    """`[C, D]`, `[K, D]` → `(cluster [C] int32, distance [C] float32)`; ties → lowest cluster
    id."""
    d2 = _sq_dist(x, centroids)
    a = jnp.argmin(d2, axis=1).astype(jnp.int32)
    return a, jnp.sqrt(jnp.maximum(jnp.take_along_axis(d2, a[:, None], axis=1)[:, 0], 0.0))


# --------------------------------------------------------------------------------------- public API

def kmeans_plus_plus(x, n_clusters: int = 10, seed: int = 0) -> np.ndarray:
    """k-means++ initial centres `[K, D]` for `x [N, D]` (deterministic for a seed)."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[0] < n_clusters:
        raise ValueError(f"need at least n_clusters={n_clusters} points; got {x.shape[0]}")
    return np.asarray(_kmeans_pp(x, jax.random.key(seed), n_clusters))


def assign_kmeans(x, centroids, chunk_size: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: `x [N, D]` (host array / memmap), `centroids [K, D]` →
    `(cluster [N] int32, distance [N] float32)` (Euclidean, in min-max space for 3×3 kernels).

    Streams `x` in chunks of chunk_size rows (last one padded: one compiled shape).
    """
    n = len(x)
    cluster = np.empty(n, np.int32)
    dist = np.empty(n, np.float32)
    c = jnp.asarray(centroids, jnp.float32)
    rows = min(chunk_size, max(1, 1 << max(n - 1, 0).bit_length()))
    for start in range(0, n, rows):
        host = np.asarray(x[start:start + rows], np.float32)
        m = len(host)
        if m < rows:
            host = np.concatenate([host, np.zeros((rows - m, host.shape[1]), np.float32)])
        a, d = _assign_block(host, c)
        cluster[start:start + m] = np.asarray(a)[:m]
        dist[start:start + m] = np.asarray(d)[:m]
    return cluster, dist


# The 3×3 path's "clustered": nearer a centroid than all but this share of random kernels drawn as
# frameworks initialise a convolution (i.i.d. uniform, PyTorch's Kaiming-uniform; i.i.d. normal,
# timm's and TF's; min-max encoding makes their scale irrelevant), whichever is stricter. k-means
# always has a nearest centroid, so without a calibrated distance every kernel, random ones
# included, would count as clustered.
RANDOM_CLUSTERED_SHARE = 0.005
CALIBRATION_KERNELS = 200_000


def calibrated_threshold(centroids, kernel_size: int, seed: int = 0,
                         share: float = RANDOM_CLUSTERED_SHARE,
                         n: int = CALIBRATION_KERNELS) -> float:
    """The distance (min-max space) below which at most `share` of `n` uniform-random and of `n`
    normal-random k×k kernels fall, for these `centroids [K, k*k]`: the 3×3 path's clustering
    threshold."""
    rng = np.random.default_rng([seed, 2024])
    shape = (n, kernel_size, kernel_size)
    quantiles = []
    for rand in (rng.uniform(-1.0, 1.0, shape), rng.standard_normal(shape)):
        _, dist = assign_kmeans(encode_valid(rand.astype(np.float32))[0], centroids)
        quantiles.append(np.quantile(dist.astype(np.float64), share))
    return float(min(quantiles))


def canonical_order(centroids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Permutation putting clusters by size descending, ties by centroid lexicographic ascending."""
    keys = [centroids[:, j] for j in range(centroids.shape[1] - 1, -1, -1)] + [-sizes]
    return np.lexsort(keys)


def fit_kmeans(x, n_clusters: int = 10, seed: int = 0, max_iter: int = 100, tol: float = 1e-6,
               chunk_size: int = DEFAULT_CHUNK) -> tuple[np.ndarray, float]:
    """k-means on `x [N, D]`: k-means++ (seeded) + Lloyd; canonical cluster order.

    Args:
      x: `[N, D]` float rows (min-max codes, dead kernels already dropped); held on device whole.
      n_clusters: K (the paper uses 10).
      seed: the jax.random.key seed of the k-means++ draw.
      max_iter: Lloyd iteration cap.
      tol: stop when Σ‖c_new − c_old‖² ≤ tol · mean per-feature variance of x (sklearn's rule).
      chunk_size: rows per distance block (memory O(chunk_size·K·D)).
    Returns:
      `(centroids [K, D] float32, inertia)`: centroids sorted by cluster size descending (ties by
      centroid lexicographic), inertia = Σ squared distance to the nearest centroid.
    """
    xj = jnp.asarray(x, jnp.float32)
    if xj.ndim != 2 or not bool(jnp.all(jnp.isfinite(xj))):
        raise ValueError("x must be a finite [N, D] array")
    init = jnp.asarray(kmeans_plus_plus(xj, n_clusters, seed))
    chunk = int(min(chunk_size, max(1, xj.shape[0])))
    cents, _ = _lloyd(xj, init, max_iter, tol, chunk)
    xb, wb = _chunked(xj, chunk)
    _, counts, inertia = _lloyd_stats(xb, wb, cents)
    cents, counts = np.asarray(cents), np.asarray(counts)
    return cents[canonical_order(cents, counts)], float(inertia)
