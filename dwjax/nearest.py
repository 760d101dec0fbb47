"""Assignment core (paper §4.2): each kernel's nearest reconstruction by cosine dissimilarity.

Given decoded reconstructions `recon [M, d]` (hyperplane coordinates, d = k*k-1, M = 10,000 in the
paper) and raw kernels `[N, k, k]`, find for each kernel

    idx[i] = argmax_j cos(embed(kernel_i), recon_j)      dis[i] = 1 − max_j cos(…)

where `embed` is preprocess.embed (centre, normalise, hyperplane basis), so `dis` is the
mean-centred cosine dissimilarity of the pixel kernels.

Tie rule: the lowest index whose float32 similarity is ≥ S − TIE_TOL, S the largest one
(TIE_TOL = 2⁻²², ~2 float32 ulps at 1.0). It does not depend on how M is tiled; below float32
rounding "the" argmax is not defined anyway.

How it is computed (the why; measured with launch/bench_assign.py on a 2-core AVX-512 CPU):
  * XLA:CPU fuses `max(X @ Rᵀ, axis=1)` into one YNNPACK kernel that never writes the `[C, M]`
    similarity matrix and runs at ~GEMM speed. `argmax` (a variadic reduce) does not fuse: it
    materialises the matrix and runs ~10× slower. So M is cut into tiles of `tile_m` rows and a
    `fori_loop` runs one fused dot+max per tile. tile_m = 64 measured best on CPU (16: per-step
    overhead, −16%; ≥128: −10% or worse, slower microkernel).
  * The loop visits tiles last to first, keeping (S, first tile with maximum ≥ S − TIE_TOL): a tile
    within TIE_TOL of the running maximum replaces the held one, and one that raises the maximum
    qualifies itself and lies lower, so the held tile is always the lowest qualifying: O(1) state.
  * Refinement: kernels sorted by winning tile, then per block of BLOCK kernels one GEMM per window
    of a few tiles covering the block's tiles (one or two), first row ≥ S − TIE_TOL. A per-kernel
    gather of its tile (a batched matrix-vector product) was slower and rounds differently from
    the tile loop's GEMM; on XLA:CPU every GEMM here rounds each element alike (one FMA chain in k
    order, whatever the shapes, for ≥ 2 rows and output widths that are multiples of 64: tile_m a
    multiple of 64, ≥ MIN_DEVICE_ROWS per device; tested), so the row found is ≥ S − TIE_TOL.
  * Host arrays (np.memmap is fine) are streamed in chunks of `chunk_size` kernels; the last chunk
    is padded so there is one compiled shape; each chunk is sharded over the mesh's "data" axis
    (shard_map: every device runs the loop on its rows, reconstructions replicated); two chunks are
    kept in flight so host reads overlap compute. Memory is O(chunk_size·k² + M·d), flat in N, plus
    the two O(N) outputs (8 bytes per kernel).
  * Dead kernels are screened in the jit with a float32 norm ratio; only rows near the threshold
    go through preprocess.valid_mask (float64, host), so the verdict is exactly valid_mask's without
    a float64 pass over every kernel (that pass cost ~10% of wall time).
  * Every dot product is float32 at HIGHEST precision, so a TPU/GPU does not silently use bf16
    passes. bfloat16 was tried on CPU: the fused dot+max is no faster.

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

# Tie tolerance (see module docstring).
TIE_TOL = 2.0 ** -22
DEFAULT_CHUNK = 32768
# Rows per tile, per backend: 64 measured best on CPU (see the module docstring); 128 is the
# TPU MXU / GPU tensor-core width (not measured: no accelerator was available).
TILE_M = {"cpu": 64, "gpu": 128, "tpu": 128}
DEFAULT_TILE_M = TILE_M["cpu"]
# fori_loop unroll of the brute-force tile loop: fewer loop-carried selects between fused calls.
UNROLL = 4
DEAD_DISSIMILARITY = 1.0
# Kernels per block of the refinement.
BLOCK = 64
REFINE_WINDOW_TILES = 2
# Rows per device of one compiled call: with ≥ 2 rows XLA:CPU runs every GEMM through its blocked
# kernel; a 1-row product takes a matrix-vector path that rounds differently (see docstring).
MIN_DEVICE_ROWS = 8
# Every dot product in float32 at full precision: TPU/GPU would otherwise run DEFAULT-precision dots
# as bf16 passes and assign kernels differently from CPU.
_HIGHEST = lax.Precision.HIGHEST


def _dot_t(a, b):
    """`a [n, d]`, `b [k, d]` → `a @ bᵀ [n, k]`, float32 at HIGHEST precision."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST)


def _tiles(recon, tile_m: int):
    """`[M, d]` → unit rows, padded to a multiple of tile_m and shaped `[M_pad/tile_m, tile_m, d]`.

    Padding repeats the last row: a copy of row M−1 ties it exactly but sits after it, so the
    lowest-index rule never picks a pad (and idx is clipped to M−1 besides).
    """
    r = preprocess.normalise_rows(jnp.asarray(recon, jnp.float32))
    m = r.shape[0]
    pad = (-m) % tile_m
    if pad:
        r = jnp.concatenate([r, jnp.broadcast_to(r[-1:], (pad, r.shape[1]))], axis=0)
    return r.reshape(-1, tile_m, r.shape[1])


def _tile_loop(x, r_tiles, unroll: int = 1):
    """Every tile, last to first: `(best [C], tile [C])` = the max similarity S and the first tile
    whose fused maximum is ≥ S − TIE_TOL.

    Why backwards: a tile within TIE_TOL of the running maximum replaces the held one; a later
    (lower) tile that raises the maximum by more than TIE_TOL qualifies itself and lies lower, so
    the held tile is always the lowest qualifying one seen, with O(1) state per kernel.
    """
    n_tiles = r_tiles.shape[0]

    def step(i, carry):
        best, tile = carry
        g = n_tiles - 1 - i
        v = jnp.max(_dot_t(x, r_tiles[g]), axis=1)  # fuses: the [C, tile_m] block is never stored
        best = jnp.maximum(best, v)
        return best, jnp.where(v >= best - TIE_TOL, g, tile)

    # Built from x (not jnp.full) so that under shard_map the carry is per-device like x.
    init = (jnp.full_like(x[:, 0], -jnp.inf), jnp.zeros_like(x[:, 0], jnp.int32))
    return lax.fori_loop(0, n_tiles, step, init, unroll=unroll)


def _first_true(mask):
    """`[B, K]` bool → `[B]` float32: index of the first True, +inf where none. A float max: XLA:CPU
    runs it vectorised, while argmax / an integer min of an iota are several times slower."""
    io = lax.broadcasted_iota(jnp.float32, mask.shape, 1)
    return -jnp.max(jnp.where(mask, -io, -jnp.inf), axis=1)


def _range_loop(xb, start, span: int, r_tiles, window: int, thr=None):
    """Scan each kernel's row range, tiles [start[b], start[b] + span), of `xb [B, d]`.

    One GEMM per window of `window` tiles over the union of the B ranges (B kernels sorted by their
    range share a window or two), windows highest first and disjoint. With `thr [B]`: returns
    `(row [B] int32, found [B] bool)`, the lowest row of the range with similarity ≥ thr (the held
    row is always the lowest qualifying one seen, windows being visited downwards). Without:
    returns the range's maximum similarity `[B]`.
    """
    c, d = xb.shape
    n_tiles, tile_m, _ = r_tiles.shape
    window = min(window, n_tiles)
    iota = lax.iota(jnp.int32, n_tiles)
    end = start + span
    need = jnp.any((iota[None, :] >= start[:, None]) & (iota[None, :] < end[:, None]), axis=0)
    col_tile = jnp.repeat(lax.iota(jnp.int32, window), tile_m)[None, :]

    def body(state):
        h, acc = state
        lo = jnp.maximum(h - window + 1, 0)
        rows = lax.dynamic_slice_in_dim(r_tiles, lo, window, 0).reshape(window * tile_m, d)
        t = lo + col_tile
        mine = (t <= h) & (t >= start[:, None]) & (t < end[:, None])
        sims = jnp.where(mine, _dot_t(xb, rows), -jnp.inf)
        if thr is None:
            acc = jnp.maximum(acc, jnp.max(sims, axis=1))
        else:
            first = _first_true(sims >= thr[:, None])
            hit = first < jnp.inf
            acc = jnp.where(hit, lo * tile_m + jnp.where(hit, first, 0).astype(jnp.int32), acc)
        return jnp.max(jnp.where(need & (iota < lo), iota, -1)), acc

    h0 = jnp.max(jnp.where(need, iota, -1))
    if thr is None:
        return lax.while_loop(lambda s: s[0] >= 0, body, (h0, jnp.full_like(xb[:, 0], -jnp.inf)))[1]
    row = lax.while_loop(lambda s: s[0] >= 0, body, (h0, jnp.full_like(start, -1)))[1]
    return jnp.maximum(row, 0), row >= 0


def _refine_rows(xb, start, span: int, best, r_tiles, window: int):
    """`row [B]`: kernel b's first row in tiles [start[b], start[b] + span) with similarity
    ≥ best[b] − TIE_TOL. Should the range's recomputed similarities all round below that (not on
    XLA:CPU, where the GEMMs here round alike; perhaps elsewhere), the first row within TIE_TOL of
    the range's recomputed maximum instead."""
    row, found = _range_loop(xb, start, span, r_tiles, window, best - TIE_TOL)

    def fallback(_):
        top = _range_loop(xb, start, span, r_tiles, window)
        again = _range_loop(xb, start, span, r_tiles, window, top - TIE_TOL)[0]
        return jnp.where(found, row, again)

    return lax.cond(jnp.all(found), lambda _: row, fallback, None)


def _sort_order(key, n_keys: int):
    """Stable ascending order of int32 `key [C]` (values < n_keys). Sorting key·C + position as one
    int32 array measured ~10× faster on XLA:CPU than a stable argsort."""
    c = key.shape[0]
    if n_keys * c < 2 ** 31:
        return jnp.sort(key * c + lax.iota(jnp.int32, c)) % c
    return jnp.argsort(key, stable=True).astype(jnp.int32)


def _unsort(order, v):
    return jnp.zeros_like(v).at[order].set(v, unique_indices=True)


def _blocks(c: int) -> int:
    """Kernels per block: BLOCK, or its gcd with the per-device chunk when BLOCK does not divide it
    (`_chunk_rows` makes that at least MIN_DEVICE_ROWS)."""
    return BLOCK if c % BLOCK == 0 else int(np.gcd(c, BLOCK))


def _refine(x, tile, best, r_tiles):
    """The refinement: `row [C]`, the first row of each kernel's tile that is ≥ best − TIE_TOL.

    Kernels are sorted by tile so that a block of BLOCK kernels needs one or two windows: one GEMM
    each, which rounds as the tile loop's does, instead of a per-kernel gather of its tile (a
    batched matrix-vector product that rounds differently and was slower).
    """
    c, d = x.shape
    n_tiles = r_tiles.shape[0]
    order = _sort_order(tile, n_tiles)
    b = _blocks(c)

    def block(args):
        xb, tb, sb = args
        return _refine_rows(xb, tb, 1, sb, r_tiles, REFINE_WINDOW_TILES)

    rows = lax.map(block, (x[order].reshape(-1, b, d), tile[order].reshape(-1, b),
                           best[order].reshape(-1, b)))
    return _unsort(order, rows.reshape(c))


def nearest_block(x, r_tiles, m: int, unroll: int = 1):
    """Brute force: nearest tiled reconstruction for unit coordinates `x [C, d]`; pure, jit-able.

    Args:
      x: `[C, d]` float32 unit (or zero) rows.
      r_tiles: `[T, tile_m, d]` float32 unit rows (from `_tiles`).
      m: the number of real reconstructions (the rest of the last tile is padding).
      unroll: fori_loop unroll of the tile loop.
    Returns:
      `(idx [C] int32, best [C] float32)`: index of the max cosine (tie rule in the module
      docstring) and the max cosine.
    """
    best, tile = _tile_loop(x, r_tiles, unroll)
    row = _refine(x, tile, best, r_tiles)
    return jnp.minimum(row, m - 1).astype(jnp.int32), best


# ------------------------------------------------------------------------------------ per chunk

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
    ratio = jnp.where(raw > 1e-20, cn / jnp.where(raw > 1e-20, raw, 1.0),
                      preprocess.DEAD_RELATIVE_NORM)
    return idx, jnp.clip(1.0 - best, 0.0, 2.0), ratio


def _valid(ratio: np.ndarray, host: np.ndarray) -> np.ndarray:
    """preprocess.valid_mask's exact verdict, cheaply: the float32 ratio decides every row more
    than 2× away from the threshold (its float32 error is a few % of the threshold at most: a mean
    that is off by a few ulps of |mean|); the float64 host function decides the rest. Running
    valid_mask on every row instead costs ~10% of wall time at 1M kernels (host work competes for
    the cores)."""
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
    fn = functools.partial(_assign_chunk, m=m, unroll=unroll)
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P(), P()),
                               out_specs=(P("data"),) * 3)
    return jax.jit(per_device, in_shardings=(bat, rep, rep), out_shardings=(rep,) * 3)


def _put(mesh: Mesh, host: np.ndarray) -> jax.Array:
    """A global host chunk (identical on every process) → sharded along axis 0."""
    if jax.process_count() == 1:
        return mesh_lib.shard_batch(mesh, host)
    # mesh.shard_batch takes this process's rows; slicing per device by index avoids assuming
    # which rows those are.
    return jax.make_array_from_callback(host.shape, mesh_lib.batch_sharded(mesh), lambda i: host[i])


def _chunk_rows(n: int, chunk_size: int, n_dev: int) -> int:
    """Rows per compiled call: chunk_size rounded up to a multiple of n_dev·MIN_DEVICE_ROWS; small N
    → the next power of 2 (so a one-chunk call does not pay for a full chunk, and repeated small
    calls reuse few shapes), at least MIN_DEVICE_ROWS per device."""
    unit = n_dev * MIN_DEVICE_ROWS
    c = -(-max(chunk_size, 1) // unit) * unit
    if n < c:
        c = min(c, max(unit, 1 << max(n - 1, 0).bit_length()))
        c = -(-c // unit) * unit
    return c


def default_tile_m(backend: str) -> int:
    return TILE_M.get(backend, DEFAULT_TILE_M)


def nearest_codes(kernels, recon, chunk_size: int = DEFAULT_CHUNK, mesh: Mesh | None = None, *,
                  tile_m: int | None = None, inflight: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each kernel's nearest reconstruction by mean-centred cosine dissimilarity.

    Args:
      kernels: `[N, k, k]` raw kernels, any float dtype; a host array or anything with `len()`,
        `.shape` and row slicing (np.memmap is read one chunk at a time).
      recon: `[M, k*k-1]` reconstructions in hyperplane coordinates (need not be unit length).
      chunk_size: kernels per compiled call (rounded up to a multiple of the device count × 8).
      mesh: a 1-axis mesh named "data" (default: mesh.data_mesh(), every device).
      tile_m: reconstructions per tile (default: `TILE_M` for the backend).
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
    backend = mesh.devices.flat[0].platform
    tile_m = default_tile_m(backend) if tile_m is None else int(tile_m)
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
