"""Assignment core (paper §4.2): each kernel's nearest reconstruction by cosine dissimilarity.

Given decoded reconstructions `recon [M, d]` (hyperplane coordinates, d = k*k-1, M = 10,000 in the
paper) and raw kernels `[N, k, k]`, find for each kernel

    idx[i] = argmax_j cos(embed(kernel_i), recon_j)      dis[i] = 1 − max_j cos(…)

where `embed` is preprocess.embed (centre, normalise, hyperplane basis), so `dis` is the
mean-centred cosine dissimilarity of the pixel kernels. Two methods give the same answer
(`method=`; `choose_method` picks one per backend, M and curve shape; launch/bench_assign.py
measures them).

Tie rule (both): the lowest index whose float32 similarity is ≥ S − TIE_TOL, S the largest one
(TIE_TOL = 2⁻²², ~2 float32 ulps at 1.0). It does not depend on how M is tiled; below float32
rounding "the" argmax is not defined anyway.

**brute** (measured on a 2-core AVX-512 CPU):
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
    gather of its tile (a batched matrix-vector product) was slower and rounds differently.

**pruned** (exact; for rows along a smooth curve, as a decoder's codes are): a sub-tile of `SUB_M`
consecutive rows lies in a small spherical cap (unit centre c, angular radius ρ, measured on the
host in float64), and for a unit x at angle θ from c every row r of the cap has
x·r ≤ cos(max(0, θ − ρ)). Each kernel gets a lower bound lb on S (its similarity to one real row per
tile); a sub-tile whose bound, widened by every float32 rounding term (`pruned_tables`), is below
lb − TIE_TOL holds no row either method could pick. XLA has no cheap per-kernel data-dependent
loop, so kernels are sorted by their best tile (far-from-curve and unprovable ones after the rest)
and searched in blocks of BLOCK kernels: the union of the block's candidate sub-tiles, as tiles,
is visited highest first in windows of WINDOW_TILES tiles, one GEMM each, keeping (S, lowest row
≥ S − TIE_TOL) as the tile loop does. Kernels the bound cannot serve (norm off: dead, denormal,
NaN) make their block visit every tile, i.e. brute force; exact zeros are answered directly
(S = 0, row 0, what brute force computes for them).

Why the two agree bit for bit: tiles the pruned search skips hold only rows < S − TIE_TOL in
float32, so S and the lowest qualifying row are decided by the rows both visit, and on XLA:CPU every
GEMM here rounds each element alike (one FMA chain in k order, whatever the shapes, for ≥ 2 rows and
output widths that are multiples of 64: tile_m a multiple of 64, ≥ MIN_DEVICE_ROWS per device;
tested). With other tile sizes or on another backend the GEMMs may round an element differently by
an ulp, so the two can differ where a row sits within that ulp of S − TIE_TOL.

Both methods: host arrays (np.memmap is fine) are streamed in chunks of `chunk_size` kernels; the
last chunk is padded so there is one compiled shape; each chunk is sharded over the mesh's "data"
axis (shard_map: every device runs on its rows, reconstructions replicated); two chunks are kept in
flight so host reads overlap compute. Memory is O(chunk_size·(k² + M/tile_m) + M·d), flat in N, plus
the two O(N) outputs (8 bytes per kernel). Every dot product is float32 at HIGHEST precision, so
a TPU/GPU does not silently use bf16 passes. bfloat16 was tried on CPU: the fused dot+max is no
faster.

Dead kernels are screened in the jit with a float32 norm ratio; only rows near the threshold go
through preprocess.valid_mask (float64, host), so the verdict is exactly valid_mask's without a
float64 pass over every kernel (that pass cost ~10% of wall time). Dead kernels (valid_mask False:
constant or all-zero) get `idx = −1` and `dis = 1.0` (what a zero vector's cosine gives: orthogonal
to everything) — never NaN, per preprocess's convention; callers filter on `idx >= 0`. `dis` is
clipped to [0, 2] (float32 rounding can make 1 − cos slightly negative for an exact match).
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple

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
METHODS = ("auto", "brute", "pruned")
# pruned: rows per bounded sub-tile; kernels per block; tiles per window GEMM of a block (and of
# brute force's refinement); blocks whose lower bound is below FAR_SIM are sorted after the rest.
SUB_M = 32
BLOCK = 64
WINDOW_TILES = 4
REFINE_WINDOW_TILES = 2
FAR_SIM = 0.7
# auto: pruned only on CPU, from this many reconstructions up, and only if they form a smooth
# curve: median sub-tile cap radius below this (radians). Measured on a curve of DoG-family
# templates: pruned/brute break even near M = 5,000 (radius 0.054).
PRUNED_MIN_M = 6000
PRUNED_MAX_RADIUS = 0.04
# Rows per device of one compiled call: with ≥ 2 rows XLA:CPU runs every GEMM through its blocked
# kernel; a 1-row product takes a matrix-vector path that rounds differently (see docstring).
MIN_DEVICE_ROWS = 8
_HIGHEST = lax.Precision.HIGHEST
_U = 2.0 ** -24  # float32 unit roundoff
# pruned: kernels whose squared norm is further than this from 1 (dead, tiny, NaN) are not pruned.
_NORM_TOL = 2.0 ** -16


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


# ----------------------------------------------------------------------------------- brute force

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


def _window_loop(xb, need, r_tiles, window: int):
    """One GEMM per window of `window` consecutive tiles over the needed tiles, highest first.

    Args:
      xb: `[B, d]` unit rows.
      need: `[T]` bool, the tiles to visit (others are skipped; windows may cover a few more).
    Returns:
      `(best [B], row [B] int32)`: S over the visited rows and the lowest row with similarity
      ≥ S − TIE_TOL. Windows go highest first and never revisit a tile, so the held row is always
      the lowest qualifying one seen (the argument of `_tile_loop`). Per window: per-tile maxima
      (one pass), the first qualifying tile, then the first qualifying row of that tile only (a
      second pass over the whole window cost ~15% more).
    """
    c, d = xb.shape
    n_tiles, tile_m, _ = r_tiles.shape
    window = min(window, n_tiles)
    iota = lax.iota(jnp.int32, n_tiles)
    w_iota = lax.iota(jnp.int32, window)

    def body(state):
        h, best, row = state
        start = jnp.maximum(h - window + 1, 0)
        rows = lax.dynamic_slice_in_dim(r_tiles, start, window, 0).reshape(window * tile_m, d)
        sims = _dot_t(xb, rows).reshape(c, window, tile_m)
        # Tiles above h were visited already (the window is clamped at tile 0).
        v = jnp.where((start + w_iota <= h)[None, :], jnp.max(sims, axis=2), -jnp.inf)
        best = jnp.maximum(best, jnp.max(v, axis=1))
        thr = (best - TIE_TOL)[:, None]
        q = _first_true(v >= thr)
        hit = q < jnp.inf
        q = jnp.where(hit, q, 0).astype(jnp.int32)
        j = _first_true(jnp.take_along_axis(sims, q[:, None, None], axis=1)[:, 0] >= thr)
        j = jnp.where(j < jnp.inf, j, 0).astype(jnp.int32)  # always < inf where hit
        row = jnp.where(hit, (start + q) * tile_m + j, row)
        return jnp.max(jnp.where(need & (iota < start), iota, -1)), best, row

    h0 = jnp.max(jnp.where(need, iota, -1))
    init = (h0, jnp.full_like(xb[:, 0], -jnp.inf), jnp.zeros_like(xb[:, 0], jnp.int32))
    _, best, row = lax.while_loop(lambda s: s[0] >= 0, body, init)
    return best, row


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
    """Brute force's refinement: `row [C]`, the first row of each kernel's tile ≥ best − TIE_TOL.

    Kernels are sorted by tile so that a block of BLOCK kernels needs one or two windows: one GEMM
    each, which rounds as the tile loop's and the pruned search's do, instead of a per-kernel
    gather of its tile (a batched matrix-vector product that rounds differently and was slower).
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


# ---------------------------------------------------------------------------------------- pruned

class PrunedTables(NamedTuple):
    """Host-built bounds for the pruned search (see `pruned_tables`); a pytree of device arrays.

    reps: `[T_pad, d]` one real row per tile (its middle row), padded with copies of the last to
      a multiple of 64 rows; the exact similarity to these is each kernel's lower bound.
    caps: `[S_pad, d+2]` per sub-tile of SUB_M rows: (unit centre, −cos ρ, sin ρ); zero rows for
      sub-tiles that are always candidates (ρ > π/2, a zero row, padding to a multiple of 64).
    thr_slack, cap_slack: `[]` float32 rounding margins (derivation in `pruned_tables`).
    radius: `[]` the median cap radius ρ in radians: ~0.03 for a decoder's curve of 10,000 codes
      (SUB_M = 32), ~1.5 for random rows, where the bound prunes nothing.
    """
    reps: jax.Array
    caps: jax.Array
    thr_slack: jax.Array
    cap_slack: jax.Array
    radius: jax.Array


def pruned_tables(r_tiles: np.ndarray) -> PrunedTables:
    """Sub-tile caps of `r_tiles [T, tile_m, d]` (float32, from `_tiles`), in float64 on the host.

    The bound. For a kernel x (float32, |‖x‖² − 1| ≤ _NORM_TOL, so |‖x‖ − 1| ≤ ε_x = _NORM_TOL)
    and a sub-tile with unit centre c (float32, ‖c‖ within ε_c of 1) whose rows r (float32,
    ‖r‖ within ε_r of 1) are all within angle ρ of c (measured here in float64 against the stored
    float32 c), the angle from x to any r is ≥ θ − ρ, θ = angle(x, c). Let L be a lower threshold.
    Every row of the sub-tile has x̂·r̂ ≤ cos(max(0, θ − ρ)), and for L ≥ 0, ρ ≤ π/2 that is < L
    exactly when cos θ < cos(arccos L + ρ) = L cos ρ − √(1 − L²) sin ρ, i.e. when

        x·c − L cos ρ + √(1 − L²) sin ρ < 0                                     (*)

    which is one row of a GEMM between `[x, L, √(1−L²)]` and `caps`, so a block's "any kernel
    might need this sub-tile" is a fused dot+max. Float32 rounding: any float32 dot product of
    length n is within γ_n = n·u/(1 − n·u) (u = 2⁻²⁴) of exact, whatever the summation order, so
      * the lower bound lb (a float32 similarity to a real row) is within γ_d of exact, and the
        maximum S of either method's float32 similarities is ≥ lb − 2γ_d;
      * a row of a pruned sub-tile has float32 similarity ≤ x·r + γ_d ≤ L + ε_x + ε_r + γ_d;
    so with L = lb − TIE_TOL − thr_slack, thr_slack = 3γ_d + ε_x + ε_r + 4u (the last for
    rounding L itself), such a row is < S − TIE_TOL in both methods: it is neither the maximum nor
    within TIE_TOL of it. (*) is evaluated in float32 with error ≤ 2.1·γ_(d+2) (the GEMM) +
    2(ε_x + ε_c) (x and c not exactly unit) + 4u (cos ρ, sin ρ, √(1 − L²) rounded); a sub-tile is
    kept unless its value is below −cap_slack, cap_slack = that sum + 2⁻²⁰.

    Returns:
      PrunedTables of device arrays (float32).
    """
    rt = np.asarray(r_tiles, np.float32)
    n_tiles, tile_m, d = rt.shape
    sub_m = _sub_rows(tile_m)
    rows = rt.reshape(-1, sub_m, d).astype(np.float64)
    norm = np.linalg.norm(rows, axis=2)
    live = norm > 0
    eps_r = float(np.max(np.abs(norm[live] - 1.0))) if live.any() else 0.0
    unit = rows / np.where(live, norm, 1.0)[..., None]
    centre = unit.sum(axis=1)
    cn = np.linalg.norm(centre, axis=1, keepdims=True)
    centre = np.where(cn > 1e-6, centre / np.maximum(cn, 1e-300), np.eye(d)[0])
    c32 = centre.astype(np.float32)
    c64 = c32.astype(np.float64)
    c_norm = np.linalg.norm(c64, axis=1)
    eps_c = float(np.max(np.abs(c_norm - 1.0)))
    cos = np.einsum("sjd,sd->sj", unit, c64) / c_norm[:, None]
    cos = np.where(live.all(axis=1), np.clip(cos.min(axis=1), -1.0, 1.0), -1.0)
    rho = np.arccos(cos) + 1e-9  # float64 rounding of the angle itself
    caps = np.concatenate([c64, -np.cos(rho)[:, None], np.sin(rho)[:, None]], axis=1)
    caps[rho > np.pi / 2] = 0.0  # (*) is 0 there: always kept
    caps = np.concatenate([caps, np.zeros((-len(caps) % 64, d + 2))]).astype(np.float32)
    reps = rt[:, tile_m // 2]
    reps = np.concatenate([reps, np.repeat(reps[-1:], -n_tiles % 64, axis=0)])

    def gamma(n):
        return n * _U / (1 - n * _U)

    thr_slack = 3 * gamma(d) + _NORM_TOL + eps_r + 4 * _U
    cap_slack = 2.1 * gamma(d + 2) + 2 * (_NORM_TOL + eps_c) + 4 * _U + 2.0 ** -20
    return PrunedTables(jnp.asarray(reps), jnp.asarray(caps), jnp.float32(thr_slack),
                        jnp.float32(cap_slack), jnp.float32(np.median(rho)))


def pruned_search(x, r_tiles, tables: PrunedTables, window: int = WINDOW_TILES):
    """Exact pruned search: `x [C, d]` → `(best [C], row [C] int32)`, the same as brute force.

    1. `p = x @ repsᵀ`: lb = max (a lower bound of S), key = its argmax tile (packed into the low
       mantissa bits so one float max gives both; key only orders kernels, it needs no exactness).
    2. Sort kernels by (group, key): near-curve kernels first, then far (lb < FAR_SIM), then those
       the bound cannot serve (norm off, L < 0: every tile), then exact zeros (dead: S = 0, row 0,
       as brute force computes them, with no work).
    3. Per block of BLOCK kernels: which sub-tiles might hold a row within TIE_TOL of the best
       (one fused dot+max over `caps`, see `pruned_tables`), hence which tiles; then `_window_loop`
       over those tiles.
    """
    c, d = x.shape
    n_tiles, tile_m, _ = r_tiles.shape
    ratio = tile_m // _sub_rows(tile_m)
    # One pass for both: the low mantissa bits of each similarity replaced by (mask − column),
    # then a float max (an int32 max measured 4× slower on XLA:CPU). For a positive maximum the
    # packed max with its low bits cleared is ≤ the float32 similarity of a real row: a valid
    # lower bound; a negative one leaves the kernel unserved (thr < 0) anyway.
    p = _dot_t(x, tables.reps)
    mask = (1 << max(int(tables.reps.shape[0] - 1).bit_length(), 1)) - 1
    packed = (lax.bitcast_convert_type(p, jnp.int32) & ~mask) | (
        mask - lax.broadcasted_iota(jnp.int32, p.shape, 1))
    top = lax.bitcast_convert_type(
        jnp.max(lax.bitcast_convert_type(packed, jnp.float32), axis=1), jnp.int32)
    lb = lax.bitcast_convert_type(top & ~mask, jnp.float32)
    key = jnp.clip(mask - (top & mask), 0, n_tiles - 1)
    n2 = jnp.sum(x * x, axis=1)
    zero = n2 == 0
    thr = lb - TIE_TOL - tables.thr_slack
    ok = (jnp.abs(n2 - 1.0) <= _NORM_TOL) & (thr >= 0)
    group = jnp.where(zero, 3, jnp.where(~ok, 2, jnp.where(lb < FAR_SIM, 1, 0)))
    order = _sort_order(group * n_tiles + key, 4 * n_tiles)
    xs, ts, oks, zs = x[order], thr[order], ok[order], zero[order]
    # 1 − L² as (1 − L)(1 + L): no cancellation when L is near 1. Kernels the bound does not
    # serve get (0, L = 1): (*) is then −cos ρ < 0, so they add no sub-tile to their block's.
    ts = jnp.where(oks, ts, 1.0)
    aug = jnp.concatenate([jnp.where(oks[:, None], xs, 0.0), ts[:, None],
                           jnp.sqrt((1.0 - ts) * (1.0 + ts))[:, None]], axis=1)
    b = _blocks(c)
    n_sub = n_tiles * ratio

    def block(args):
        xb, ab, okb, zb = args
        kept = jnp.max(_dot_t(tables.caps, ab), axis=1)  # fuses: [S_pad] per block
        need = jnp.any((kept[:n_sub] >= -tables.cap_slack).reshape(n_tiles, ratio), axis=1)
        # A block of zeros needs nothing; a kernel the bound does not serve needs every tile.
        need = (need & jnp.any(okb)) | jnp.any(~okb & ~zb)
        best, row = _window_loop(xb, need, r_tiles, window)
        return jnp.where(zb, 0.0, best), jnp.where(zb, 0, row)

    best, row = lax.map(block, (xs.reshape(-1, b, d), aug.reshape(-1, b, d + 2),
                                oks.reshape(-1, b), zs.reshape(-1, b)))
    return _unsort(order, best.reshape(c)), _unsort(order, row.reshape(c))


def _sub_rows(tile_m: int) -> int:
    return SUB_M if tile_m % SUB_M == 0 else int(np.gcd(tile_m, SUB_M))


# ------------------------------------------------------------------------------------ per chunk

def _assign_chunk(kernels, r_tiles, basis, tables, m: int, method: str, unroll: int = 1):
    """`[C, k, k]` raw kernels → `(idx [C] int32, dis [C] float32, ratio [C] float32)`.

    `ratio` = centred norm / raw norm in float32, the dead-kernel screen (see `_valid`); set to
    the threshold itself (undecided) where the raw norm is too small for float32 to judge.
    `tables` is None for brute force.
    """
    x = preprocess.embed(kernels, basis)
    if method == "pruned":
        best, row = pruned_search(x, r_tiles, tables)
        idx = jnp.minimum(row, m - 1).astype(jnp.int32)
    else:
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
def _compiled(mesh: Mesh, m: int, method: str, unroll: int = UNROLL):
    """The jitted chunk function for one mesh: kernels sharded on "data", the rest replicated.

    shard_map: each device runs `_assign_chunk` on its own rows (no communication; shapes local).
    Outputs are then replicated (tiny `[C]` vectors) so every process can read all of them.
    """
    bat, rep = mesh_lib.batch_sharded(mesh), mesh_lib.replicated(mesh)
    fn = functools.partial(_assign_chunk, m=m, method=method, unroll=unroll)
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P(), P(), P()),
                               out_specs=(P("data"),) * 3)
    return jax.jit(per_device, in_shardings=(bat, rep, rep, rep), out_shardings=(rep,) * 3)


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


def choose_method(backend: str, n: int, m: int, radius: float | None = None) -> str:
    """"brute" or "pruned" for N kernels against M reconstructions on `backend` ("cpu", "gpu",
    "tpu"), measured with launch/bench_assign.py:

      * GPU/TPU: brute force. Its fused GEMM is what accelerators are built for, and the pruned
        search's sequential per-block loop of small GEMMs would leave most of the chip idle (not
        measured: no accelerator was available; rerun the benchmark there to revisit).
      * CPU, M < PRUNED_MIN_M: brute force (few tiles: the bound pass and the block loop cost as
        much as they save).
      * CPU, `radius` (the median sub-tile cap radius, `PrunedTables.radius`) ≥ PRUNED_MAX_RADIUS:
        brute force: the rows are too far apart along the curve, or form no curve at all (random
        rows: ~1.7 rad), and the bound prunes too little.
      * CPU otherwise: pruned (N does not matter: both compile once per chunk shape).
    """
    if backend != "cpu" or m < PRUNED_MIN_M:
        return "brute"
    if radius is not None and radius >= PRUNED_MAX_RADIUS:
        return "brute"
    return "pruned"


def default_tile_m(backend: str) -> int:
    return TILE_M.get(backend, DEFAULT_TILE_M)


def nearest_codes(kernels, recon, chunk_size: int = DEFAULT_CHUNK, mesh: Mesh | None = None, *,
                  method: str = "auto", tile_m: int | None = None, inflight: int = 2,
                  log=None) -> tuple[np.ndarray, np.ndarray]:
    """Each kernel's nearest reconstruction by mean-centred cosine dissimilarity.

    Args:
      kernels: `[N, k, k]` raw kernels, any float dtype; a host array or anything with `len()`,
        `.shape` and row slicing (np.memmap is read one chunk at a time).
      recon: `[M, k*k-1]` reconstructions in hyperplane coordinates (need not be unit length).
      chunk_size: kernels per compiled call (rounded up to a multiple of the device count × 8).
      mesh: a 1-axis mesh named "data" (default: mesh.data_mesh(), every device).
      method: "brute", "pruned" (same answer; see the module docstring) or "auto"
        (`choose_method` for the mesh's backend, M and the rows' curve radius).
      tile_m: reconstructions per tile (default: `TILE_M` for the backend).
      inflight: chunks dispatched ahead of the one being read back.
      log: optional callable, given one line saying which method ran and why (for "auto").
    Returns:
      `(idx [N] int32, dis [N] float32)`: index into recon (−1 for a dead kernel) and
      1 − max cosine (1.0 for a dead kernel).
    """
    shape = tuple(kernels.shape[1:])
    k = int(round(np.sqrt(np.prod(shape))))
    if k * k != int(np.prod(shape)):
        raise ValueError(f"kernels must be [N, k, k]; got {kernels.shape}")
    searcher = Searcher(recon, k, mesh, method=method, tile_m=tile_m, chunk_size=chunk_size,
                        inflight=inflight, log=log)
    return searcher(kernels)


class Searcher:
    """`nearest_codes` prepared once for many calls against the same reconstructions: the tiles,
    the pruning tables and the method choice are built here, each call only streams kernels.

    `fixed_shape=True` runs every call at the full `chunk_size` shape (padding small calls), so a
    kernel's answer does not depend on how a job was cut into calls.
    """

    def __init__(self, recon, kernel_size: int, mesh: Mesh | None = None, *,
                 method: str = "auto", tile_m: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK, inflight: int = 2, fixed_shape: bool = False,
                 log=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        k = kernel_size
        recon = np.asarray(recon, np.float32)
        if recon.ndim != 2 or recon.shape[1] != k * k - 1 or len(recon) == 0:
            raise ValueError(f"recon must be [M, {k * k - 1}] with M > 0; got {recon.shape}")
        self.k, self.m, self.chunk_size, self.inflight = k, len(recon), chunk_size, inflight
        self.fixed_shape = fixed_shape
        self.mesh = mesh = mesh_lib.data_mesh() if mesh is None else mesh
        backend = mesh.devices.flat[0].platform
        self.tile_m = tile_m = default_tile_m(backend) if tile_m is None else int(tile_m)
        rep = mesh_lib.replicated(mesh)
        r_host = np.asarray(_tiles(recon, tile_m))  # the tables are built from it on the host
        self.r_tiles = jax.device_put(r_host, rep)
        tables = None
        if method == "auto":
            method = choose_method(backend, 0, self.m)
            if method == "pruned":
                tables = pruned_tables(r_host)
                radius = float(tables.radius)
                method = choose_method(backend, 0, self.m, radius)
                why = f"median cap radius {radius:.3f} rad"
            else:
                why = f"backend {backend}, M = {self.m}"
            if log is not None:
                log(f"nearest-code search: {method} ({why}; tile_m = {tile_m}, "
                    f"{mesh.size} device(s))")
        if method == "pruned" and tables is None:
            tables = pruned_tables(r_host)
        self.method = method
        self.tables = None if method == "brute" else jax.device_put(tables, rep)
        self.basis = jax.device_put(preprocess.hyperplane_basis(k), rep)
        self.fn = _compiled(mesh, self.m, method)

    def __call__(self, kernels) -> tuple[np.ndarray, np.ndarray]:
        """`[N, k, k]` → `(idx [N] int32, dis [N] float32)`, as `nearest_codes`."""
        n, k = len(kernels), self.k
        idx = np.empty(n, np.int32)
        dis = np.empty(n, np.float32)
        if n == 0:
            return idx, dis
        c = _chunk_rows(self.chunk_size if self.fixed_shape else n, self.chunk_size,
                        self.mesh.size)
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
            pending.append((start, rows, host, self.fn(_put(self.mesh, host), self.r_tiles,
                                                       self.basis, self.tables)))
            if len(pending) > self.inflight:
                drain()
        while pending:
            drain()
        return idx, dis
