"""Kernel preprocessing and the cosine dissimilarity: the one implementation every stage uses.

A kernel x (k×k) becomes r = (x − mean x) / ‖x − mean x‖: centred and unit length, so it lies on the
unit sphere of the hyperplane 1ᵀr = 0 and is invariant to x → a·x + b (a > 0). In an orthonormal
basis B (k²×(k²−1)) of that hyperplane, r has coordinates c = Bᵀr with ‖c‖ = 1, and for any two
kernels the mean-centred cosine of the pixel vectors equals the *plain* cosine of their coordinates.
The coordinates are not zero-mean: centring them again would change the angle (a wrong loss).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

# Centred norm below this fraction of the raw norm: a dead or constant kernel (EfficientNet-Lite has
# all-zero channels). Relative, so a·x keeps its verdict; 1e-5 is ~100× float32 rounding of a
# constant.
DEAD_RELATIVE_NORM = 1e-5
# Largest |weight| below this: a negligible kernel, dead too. Below it float32 loses the pattern
# (squares underflow near 1e-19), so a ~1e-20 kernel would otherwise be "live" with an arbitrary
# code; real kernels are many orders of magnitude larger (pruned channels are exact zeros).
DEAD_ABSOLUTE_MAX = 1e-12
# The precision of every jax dot product in dwjax (embedding, training, search, k-means): full
# float32. On TPU float32 matmuls default to bfloat16 passes (recent GPUs: TF32), and results must
# match across backends: the same kernels embedded, trained on and assigned alike everywhere.
PRECISION = lax.Precision.HIGHEST


def valid_mask(kernels: np.ndarray) -> np.ndarray:
    """`[N]` bool: False for dead kernels (dropped and counted, never NaN): constant ones (centred
    norm ≤ DEAD_RELATIVE_NORM × raw norm, scale-free) and negligible ones (max |w| below
    DEAD_ABSOLUTE_MAX, where float32 cannot hold their pattern). The one rule of every path.

    Args:
      kernels: `[N, k, k]` (or `[N, k*k]`), any float dtype; computed in float64 on the host.
    """
    flat = np.asarray(kernels, np.float64).reshape(len(kernels), -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    cn = np.linalg.norm(centred, axis=1)
    raw = np.linalg.norm(flat, axis=1)
    return (cn > DEAD_RELATIVE_NORM * raw + 1e-30) & (np.abs(flat).max(axis=1, initial=0.0)
                                                      >= DEAD_ABSOLUTE_MAX)


@functools.lru_cache(maxsize=None)
def _basis_np(kernel_size: int) -> np.ndarray:
    n = kernel_size * kernel_size
    # Helmert basis: column j (1..n-1) is (1,…,1, −j, 0,…,0)/√(j(j+1)) with j ones. Orthonormal,
    # orthogonal to 1, exact and independent of any random seed or LAPACK version.
    b = np.zeros((n, n - 1), np.float64)
    for j in range(1, n):
        b[:j, j - 1] = 1.0
        b[j, j - 1] = -float(j)
        b[:, j - 1] /= np.sqrt(j * (j + 1.0))
    return b


def hyperplane_basis(kernel_size: int) -> np.ndarray:
    """`[k*k, k*k-1]` float32 orthonormal basis of {r : 1ᵀr = 0} (columns)."""
    return _basis_np(kernel_size).astype(np.float32)


def centre_and_normalise(kernels, xp=jnp):
    """`[N, k, k]` or `[N, k*k]` → `[N, k*k]` centred unit vectors (zero vector for a dead
    kernel); `xp` jax.numpy (float32, jit-able) or numpy (float64, no compile: host estimates)."""
    dtype = np.float64 if xp is np else jnp.float32
    flat = xp.reshape(kernels, (kernels.shape[0], -1)).astype(dtype)
    centred = flat - xp.mean(flat, axis=1, keepdims=True)
    norm = xp.linalg.norm(centred, axis=1, keepdims=True)
    return centred / xp.where(norm > 0, norm, 1.0)


def raw_statistics(kernels):
    """`[N, k, k]` raw kernels → `(total [N], norm [N], peak [N])` float32 (jit-able): the sum of
    each kernel's weights, their L2 norm and their largest |w|. The norm is taken of the kernel
    divided by its peak, so a kernel whose squares fall below float32's range (a ~1e-20 one)
    still gets its norm, not 0. Float32 sums are within γₙ·Σ|w| of exact (γₙ = nu/(1 − nu), u =
    2⁻²⁴): relative to the kernel's magnitude, not to a total near zero."""
    flat = jnp.reshape(kernels, (kernels.shape[0], -1)).astype(jnp.float32)
    peak = jnp.max(jnp.abs(flat), axis=1)
    scale = jnp.where(peak > 0, peak, 1.0)
    norm = peak * jnp.linalg.norm(flat / scale[:, None], axis=1)
    return jnp.sum(flat, axis=1), norm, peak


def embed(kernels, basis=None, xp=jnp):
    """`[N, k, k]` → `[N, k*k-1]` unit coordinates in the hyperplane basis (jit-able); with
    `xp=numpy`, in float64 on the host."""
    k = int(round(np.sqrt(np.prod(kernels.shape[1:]))))
    if xp is np:
        basis = _basis_np(k) if basis is None else np.asarray(basis, np.float64)
        return centre_and_normalise(np.asarray(kernels), np) @ basis
    basis = hyperplane_basis(k) if basis is None else basis
    return jnp.matmul(centre_and_normalise(kernels), basis, precision=PRECISION)


def unembed(coords, kernel_size: int):
    """`[N, k*k-1]` coordinates → `[N, k, k]` pixel-space kernels (centred; unit if coords are)."""
    pixels = jnp.matmul(coords, hyperplane_basis(kernel_size).T, precision=PRECISION)
    return jnp.reshape(pixels, (-1, kernel_size, kernel_size))


def coords_to_kernels(coords, kernel_size: int) -> np.ndarray:
    """`[M, k*k-1]` decoder outputs → `[M, k, k]` unit, centred pixel-space kernels (host array)."""
    return np.asarray(unembed(normalise_rows(jnp.asarray(coords)), kernel_size))


def cosine_dissimilarity(x, y):
    """Row-wise 1 − cos(x, y) of coordinate vectors `[N, d]`, `[N, d]` → `[N]`.

    On hyperplane coordinates this *is* the mean-centred cosine dissimilarity of the kernels.
    """
    num = jnp.sum(x * y, axis=-1)
    den = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    return 1.0 - num / jnp.maximum(den, 1e-12)


def normalise_rows(x):
    """`[M, d]` → rows scaled to unit length (zero rows stay zero)."""
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(n, 1e-12)


def centred_cosine_dissimilarity_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference in pixel space, numpy float64: 1 − cos(a − mean a, b − mean b), `[N, k, k]` →
    `[N]`."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return 1.0 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
