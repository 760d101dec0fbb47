"""The nearest-code search's device programs: brute force (`nearest_block`) and the exact pruned
search (`pruned_tables`, `pruned_search`), pure and jit-able. How and why they work, and why the
two agree bit for bit, is in dwjax/search/nearest.py's docstring; nearest.py streams kernels through
them.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from dwjax.model import preprocess

# Tie tolerance (see dwjax/search/nearest.py's docstring).
TIE_TOL = 2.0 ** -22
# pruned: rows per bounded sub-tile; kernels per block; tiles per window GEMM of a block (and of
# brute force's refinement); blocks whose lower bound is below FAR_SIM are sorted after the rest.
SUB_M = 32
BLOCK = 64
WINDOW_TILES = 4
REFINE_WINDOW_TILES = 2
FAR_SIM = 0.7
_U = 2.0 ** -24  # float32 unit roundoff
# pruned: kernels whose squared norm is further than this from 1 (dead, tiny, NaN) are not pruned.
_NORM_TOL = 2.0 ** -16


def _dot_t(a, b):
    """`a [n, d]`, `b [k, d]` → `a @ bᵀ [n, k]`, float32 at preprocess.PRECISION."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=preprocess.PRECISION)


def tiles(recon, tile_m: int) -> np.ndarray:
    """`[M, d]` → unit rows (normalised in float64 on the host, then rounded to float32), padded
    to a multiple of tile_m and shaped `[M_pad/tile_m, tile_m, d]`; zero rows stay zero.

    Padding repeats the last row: a copy of row M−1 ties it exactly but sits after it, so the
    lowest-index rule never picks a pad (and idx is clipped to M−1 besides).
    """
    r = np.asarray(recon, np.float64)
    r = (r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
    pad = (-len(r)) % tile_m
    if pad:
        r = np.concatenate([r, np.repeat(r[-1:], pad, axis=0)])
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
      (one pass), the first qualifying tile, then the first qualifying row of that tile only
      (cheaper than a second pass over the whole window).
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
    """Stable ascending order of int32 `key [C]` (values < n_keys): key·C + position sorted as one
    int32 array, since a stable argsort is much slower on XLA:CPU."""
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
      r_tiles: `[T, tile_m, d]` float32 unit rows (from `tiles`).
      m: the number of real reconstructions (the rest of the last tile is padding).
      unroll: fori_loop unroll of the tile loop.
    Returns:
      `(idx [C] int32, best [C] float32)`: index of the max cosine (tie rule in nearest.py's
      docstring) and the max cosine.
    """
    best, tile = _tile_loop(x, r_tiles, unroll)
    row = _refine(x, tile, best, r_tiles)
    return jnp.minimum(row, m - 1).astype(jnp.int32), best


# ---------------------------------------------------------------------------------------- pruned

class PrunedTables(NamedTuple):
    """Host-built bounds for the pruned search (see `pruned_tables`); a pytree of float32 arrays
    (numpy as built; put them on the devices once per job).

    reps: `[T_pad, d]` one real row per tile (its middle row), padded with copies of the last to
      a multiple of 64 rows; the exact similarity to these is each kernel's lower bound.
    caps: `[S_pad, d+2]` per sub-tile of SUB_M rows: (unit centre, −cos ρ, sin ρ); zero rows for
      sub-tiles that are always candidates (ρ > π/2, a zero row, padding to a multiple of 64).
    thr_slack, cap_slack: `[]` float32 rounding margins (derivation in `pruned_tables`).
    radius: `[]` the median cap radius ρ in radians: ~0.03 for a decoder's curve of 10,000 codes
      (SUB_M = 32), ~1.5 for random rows, where the bound prunes nothing.
    """
    reps: np.ndarray
    caps: np.ndarray
    thr_slack: np.ndarray
    cap_slack: np.ndarray
    radius: np.ndarray


def pruned_tables(r_tiles: np.ndarray) -> PrunedTables:
    """Sub-tile caps of `r_tiles [T, tile_m, d]` (float32, from `tiles`), in float64 on the host.

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
      PrunedTables of numpy float32 arrays.
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
    return PrunedTables(reps, caps, np.float32(thr_slack), np.float32(cap_slack),
                        np.float32(np.median(rho)))


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
    # then a float max (an int32 max is much slower on XLA:CPU). For a positive maximum the
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
