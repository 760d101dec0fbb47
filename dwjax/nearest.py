"""Assignment core (paper §4.2): each kernel's nearest reconstruction by cosine dissimilarity.

Given decoded reconstructions `recon [M, d]` (hyperplane coordinates, d = k*k-1, M = 10,000 in the
paper) and raw kernels `[N, k, k]`, find for each kernel

    idx[i] = argmax_j cos(embed(kernel_i), recon_j)      dis[i] = 1 − max_j cos(…)

where `embed` is preprocess.embed (centre, normalise, hyperplane basis), so `dis` is the mean-centred
cosine dissimilarity of the pixel kernels.

How it is computed (the why; measured with launch/bench_assign.py on this 2-core AVX-512 CPU):
  * XLA:CPU fuses `max(X @ Rᵀ, axis=1)` into one YNNPACK kernel that never writes the `[C, M]`
    similarity matrix and runs at ~GEMM speed. `argmax` (a variadic reduce) does not fuse: it
    materialises the matrix and runs ~10× slower; so does `min(where(s >= max, iota, M))`. So the M
    axis is cut into tiles of `tile_m` rows and a `fori_loop` keeps a running (best value, best tile)
    per kernel, each step one fused dot+max. tile_m = 64 measured best (16: per-step overhead, −16%;
    ≥128: −10% or worse, slower microkernel); the tiled loop measured as fast as the untiled fused max.
  * Refinement: the `[C, tile_m]` similarities of each kernel's winning tile only, recomputed in
    blocks of 64 kernels (a whole-chunk gather of `[C, tile_m, d]` is memory-bound and costs as much
    as the tile loop; in blocks it stays in cache and costs ~13% of the loop: the gather moves
    tile_m·d floats per kernel. Sorting kernels by tile to share the gathers saved only ~5%, not
    worth the code).
  * Host arrays (np.memmap is fine) are streamed in chunks of `chunk_size` kernels; the last chunk is
    padded so there is one compiled shape; each chunk is sharded over the mesh's "data" axis
    (shard_map: every device runs the loop on its rows, reconstructions replicated); two chunks are
    kept in flight so host reads overlap compute. Memory is O(chunk_size·k² + 64·tile_m·d), flat
    in N, plus the two O(N) outputs (8 bytes per kernel).
  * Dead kernels are screened in the jit with a float32 norm ratio; only rows near the threshold
    go through preprocess.valid_mask (float64, host), so the verdict is exactly valid_mask's without
    a float64 pass over every kernel (that pass cost ~10% of wall time).
  * bfloat16 was tried: XLA:CPU's fused dot+max is no faster in bf16 here, so everything is float32.

Ties: the lowest index wins, as numpy's argmax: across tiles exactly (strict `>` on the fused float32
maxima); inside the winning tile, the first entry within `TIE_TOL` (2⁻²², ~2 float32 ulps at 1.0) of
the tile's recomputed maximum, because the refinement's dot may round differently from the fused
kernel's by an ulp. Below float32 dot-product rounding "the" argmax is not defined anyway.

Dead kernels (preprocess.valid_mask False: constant or all-zero) get `idx = −1` and `dis = 1.0`
(what a zero vector's cosine gives: orthogonal to everything) — never NaN, per preprocess's
convention; callers filter on `idx >= 0`. `dis` is clipped to [0, 2] (float32 rounding can make
1 − cos slightly negative for an exact match).
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from dwjax import mesh as mesh_lib
from dwjax import preprocess

# Tie tolerance inside the winning tile (see module docstring).
TIE_TOL = 2.0 ** -22
DEFAULT_CHUNK = 32768
DEFAULT_TILE_M = 64
# fori_loop unroll of the tile loop: fewer loop-carried selects between fused calls (~+3% at small C).
UNROLL = 4
DEAD_DISSIMILARITY = 1.0
# Every dot product in float32 at full precision: TPU/GPU would otherwise run DEFAULT-precision dots
# as bf16 passes and assign kernels differently from CPU.
_HIGHEST = lax.Precision.HIGHEST


def _tiles(recon, tile_m: int):
    """`[M, d]` → unit rows, padded to a multiple of tile_m and shaped `[M_pad/tile_m, tile_m, d]`.

    Padding repeats the last row: a copy of row M−1 can tie it but sits after it in the same tile,
    so the lowest-index rule never picks a pad (and idx is clipped to M−1 besides).
    """
    r = preprocess.normalise_rows(jnp.asarray(recon, jnp.float32))
    m = r.shape[0]
    pad = (-m) % tile_m
    if pad:
        r = jnp.concatenate([r, jnp.broadcast_to(r[-1:], (pad, r.shape[1]))], axis=0)
    return r.reshape(-1, tile_m, r.shape[1])


def nearest_block(x, r_tiles, m: int, unroll: int = 1, refine_rows: int = 64):
    """Nearest tiled reconstruction for unit coordinates `x [C, d]`; pure, jit-able.

    Args:
      x: `[C, d]` float32 unit (or zero) rows.
      r_tiles: `[T, tile_m, d]` float32 unit rows (from `_tiles`).
      m: the number of real reconstructions (the rest of the last tile is padding).
      unroll: fori_loop unroll of the tile loop.
      refine_rows: rows per refinement block (if it does not divide C, its gcd with C is used).
    Returns:
      `(idx [C] int32, best [C] float32)`: index of the max cosine and the max cosine.
    """
    n_tiles, tile_m, d = r_tiles.shape
    c = x.shape[0]

    def step(g, carry):
        best, tile = carry
        # Fuses: the [C, tile_m] block is never stored.
        v = jnp.max(jnp.matmul(x, r_tiles[g].T, precision=_HIGHEST), axis=1)
        better = v > best                       # strict: earlier tile wins an exact tie
        return jnp.where(better, v, best), jnp.where(better, g, tile)

    # Built from x (not jnp.full) so that under shard_map the carry is per-device like x.
    init = (jnp.full_like(x[:, 0], -jnp.inf), jnp.zeros_like(x[:, 0], jnp.int32))
    best, tile = lax.fori_loop(0, n_tiles, step, init, unroll=unroll)

    # Refine: the winning tile's similarities, first entry within TIE_TOL of their maximum. Done in
    # blocks of refine_rows kernels so the gathered [rows, tile_m, d] stays in cache (one gather of
    # the whole chunk is memory-bound and costs as much as the tile loop).
    def refine(args):
        xb, tb = args
        s = jnp.einsum("cd,ctd->ct", xb, r_tiles[tb], precision=_HIGHEST)
        hit = s >= jnp.max(s, axis=1, keepdims=True) - TIE_TOL  # ≥ 1 hit whatever the rounding
        j = jnp.min(jnp.where(hit, lax.broadcasted_iota(jnp.int32, s.shape, 1), tile_m - 1), axis=1)
        return tb * tile_m + j

    b = refine_rows if c % refine_rows == 0 else int(np.gcd(c, refine_rows))
    idx = lax.map(refine, (x.reshape(-1, b, d), tile.reshape(-1, b))).reshape(c)
    return jnp.minimum(idx, m - 1).astype(jnp.int32), best


def _assign_chunk(kernels, r_tiles, basis, m: int, unroll: int = 1):
    """`[C, k, k]` raw kernels → `(idx [C] int32, dis [C] float32, ratio [C] float32)`.

    `ratio` = centred norm / raw norm in float32, the dead-kernel screen (see `_valid`); set to
    the threshold itself (undecided) where the raw norm is too small for float32 to judge.
    """
    x = preprocess.embed(kernels, basis)
    idx, best = nearest_block(x, r_tiles, m, unroll)
    flat = kernels.reshape(kernels.shape[0], -1).astype(jnp.float32)
    raw = jnp.linalg.norm(flat, axis=1)
    cn = jnp.linalg.norm(flat - jnp.mean(flat, axis=1, keepdims=True), axis=1)
    ratio = jnp.where(raw > 1e-20, cn / jnp.where(raw > 1e-20, raw, 1.0), preprocess.DEAD_RELATIVE_NORM)
    return idx, jnp.clip(1.0 - best, 0.0, 2.0), ratio


def _valid(ratio: np.ndarray, host: np.ndarray) -> np.ndarray:
    """preprocess.valid_mask's exact verdict, cheaply: the float32 ratio decides every row more than
    2× away from the threshold (its float32 error is a few % of the threshold at most: a mean that is
    off by a few ulps of |mean|); the float64 host function decides the rest. Running valid_mask on
    every row instead costs ~10% of wall time at 1M kernels (host work competes for the cores)."""
    t = preprocess.DEAD_RELATIVE_NORM
    valid = ratio > 2 * t
    border = (ratio > 0.5 * t) & ~valid
    if border.any():
        valid[border] = preprocess.valid_mask(host[border])
    return valid


@functools.lru_cache(maxsize=None)
def _compiled(mesh: Mesh, m: int, unroll: int = UNROLL):
    """The jitted chunk function for one mesh: kernels sharded on "data", the rest replicated.

    shard_map: each device runs `_assign_chunk` on its own rows (no communication; shapes local).
    Outputs are then replicated (tiny `[C]` vectors) so every process can read all of them.
    """
    bat, rep = mesh_lib.batch_sharded(mesh), mesh_lib.replicated(mesh)
    per_device = jax.shard_map(functools.partial(_assign_chunk, m=m, unroll=unroll), mesh=mesh,
                               in_specs=(P("data"), P(), P()), out_specs=(P("data"),) * 3)
    return jax.jit(per_device, in_shardings=(bat, rep, rep), out_shardings=(rep,) * 3)


def _put(mesh: Mesh, host: np.ndarray) -> jax.Array:
    """A global host chunk (identical on every process) → sharded along axis 0."""
    if jax.process_count() == 1:
        return mesh_lib.shard_batch(mesh, host)
    # mesh.shard_batch takes this process's rows; slicing per device by index avoids assuming
    # which rows those are.
    return jax.make_array_from_callback(host.shape, mesh_lib.batch_sharded(mesh), lambda i: host[i])


def _chunk_rows(n: int, chunk_size: int, n_dev: int) -> int:
    """Rows per compiled call: chunk_size rounded up to the device count; small N → next power of 2
    (so a one-chunk call does not pay for a full chunk, and repeated small calls reuse few shapes)."""
    c = -(-max(chunk_size, 1) // n_dev) * n_dev
    if n < c:
        c = min(c, max(n_dev, 1 << max(n - 1, 0).bit_length()))
        c = -(-c // n_dev) * n_dev
    return c


def nearest_codes(kernels, recon, chunk_size: int = DEFAULT_CHUNK, mesh: Mesh | None = None, *,
                  tile_m: int = DEFAULT_TILE_M, inflight: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each kernel's nearest reconstruction by mean-centred cosine dissimilarity.

    Args:
      kernels: `[N, k, k]` raw kernels, any float dtype; a host array or anything with `len()`,
        `.shape` and row slicing (np.memmap is read one chunk at a time).
      recon: `[M, k*k-1]` reconstructions in hyperplane coordinates (need not be unit length).
      chunk_size: kernels per compiled call (rounded up to a multiple of the device count).
      mesh: a 1-axis mesh named "data" (default: mesh.data_mesh(), every device).
      tile_m: reconstructions per fused dot+max step (see module docstring).
      inflight: chunks dispatched ahead of the one being read back.
    Returns:
      `(idx [N] int32, dis [N] float32)`: index into recon (−1 for a dead kernel) and
      1 − max cosine (1.0 for a dead kernel).
    """
    n = len(kernels)
    shape = tuple(kernels.shape[1:])
    k = int(round(np.sqrt(np.prod(shape))))
    if k * k != int(np.prod(shape)):
        raise ValueError(f"kernels must be [N, k, k]; got {kernels.shape}")
    recon = np.asarray(recon, np.float32)
    if recon.ndim != 2 or recon.shape[1] != k * k - 1 or len(recon) == 0:
        raise ValueError(f"recon must be [M, {k * k - 1}] with M > 0; got {recon.shape}")
    idx = np.empty(n, np.int32)
    dis = np.empty(n, np.float32)
    if n == 0:
        return idx, dis
    mesh = mesh_lib.data_mesh() if mesh is None else mesh
    rep = mesh_lib.replicated(mesh)
    r_tiles = jax.device_put(_tiles(recon, tile_m), rep)
    basis = jax.device_put(preprocess.hyperplane_basis(k), rep)
    fn = _compiled(mesh, len(recon))
    c = _chunk_rows(n, chunk_size, mesh.size)

    pending: collections.deque = collections.deque()

    def drain():
        start, rows, host, out = pending.popleft()
        i_c, d_c, ratio = (np.asarray(o)[:rows] for o in out)
        valid = _valid(ratio, host[:rows])
        idx[start:start + rows] = np.where(valid, i_c, -1)
        dis[start:start + rows] = np.where(valid, d_c, DEAD_DISSIMILARITY)

    for start in range(0, n, c):
        host = np.asarray(kernels[start:start + c], np.float32).reshape(-1, k, k)
        rows = len(host)
        if rows < c:  # pad the last chunk: one compiled shape; padded rows are dropped
            host = np.concatenate([host, np.zeros((c - rows, k, k), np.float32)])
        pending.append((start, rows, host, fn(_put(mesh, host), r_tiles, basis)))
        if len(pending) > inflight:
            drain()
    while pending:
        drain()
    return idx, dis

