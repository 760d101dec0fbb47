"""Which nearest-code search a job runs (`--config.search=auto`): brute force or the exact pruned
search (dwjax/search/nearest.py), from the backend, the number of codes, the curve's shape and a
sample of the job's own kernels. Host numpy only: deciding compiles nothing.
"""
from __future__ import annotations

import jax
import numpy as np

from dwjax.model import preprocess
from dwjax.search.device_programs import BLOCK, SUB_M, TIE_TOL, PrunedTables

# auto: pruned only on CPU, from this many reconstructions up, and only if they form a smooth
# curve: median sub-tile cap radius below this (radians). Both keep a margin on brute force's side
# of where the two break even on a curve of DoG-family templates (BENCHMARKS.md).
PRUNED_MIN_M = 6000
PRUNED_MAX_RADIUS = 0.04
# Above this share of tiles visited (pruned_visit_fraction) the bound's pass and the block loop
# cost more than they save.
PRUNED_MAX_VISITS = 0.5
# jaxlib releases whose XLA:CPU runs the pruned search's block loop many times slower (fixed in
# 0.10.2; BENCHMARKS.md, version floors): brute force there.
PRUNED_SLOW_JAX = ("0.10.0", "0.10.1")


def choose_method(backend: str, n: int, m: int, radius: float | None = None,
                  visit_fraction: float | None = None) -> str:
    """"brute" or "pruned" for N kernels against M reconstructions on `backend` ("cpu", "gpu",
    "tpu"):

      * GPU/TPU: brute force. Its fused GEMM is what accelerators are built for, and the pruned
        search's sequential per-block loop of small GEMMs would leave most of the chip idle (not
        yet timed on an accelerator; rerun the benchmark there to revisit).
      * CPU, M < PRUNED_MIN_M: brute force (few tiles: the bound pass and the block loop cost as
        much as they save).
      * CPU with a jax in PRUNED_SLOW_JAX: brute force (that XLA runs the block loop slowly).
      * CPU, `radius` (the median sub-tile cap radius, `PrunedTables.radius`) ≥ PRUNED_MAX_RADIUS:
        brute force: the rows are too far apart along the curve, or form no curve at all (random
        rows: ~1.7 rad), and the bound prunes too little.
      * CPU, `visit_fraction` (`pruned_visit_fraction` on a sample of the job's kernels) above
        PRUNED_MAX_VISITS: brute force: the bound would keep most tiles (a degenerate curve whose
        codes all decode alike has radius ~0 and yet prunes nothing).
      * CPU otherwise: pruned (N does not matter: both compile once per chunk shape).
    """
    if backend != "cpu" or m < PRUNED_MIN_M or jax.__version__ in PRUNED_SLOW_JAX:
        return "brute"
    if radius is not None and radius >= PRUNED_MAX_RADIUS:
        return "brute"
    if visit_fraction is not None and visit_fraction > PRUNED_MAX_VISITS:
        return "brute"
    return "pruned"


def pruned_visit_fraction(tables: PrunedTables, kernels, tile_m: int) -> float:
    """The share of tiles the pruned search would visit for `kernels [n, k, k]` (a sample of a
    job), estimated on the host: each kernel's kept sub-tiles by the cap bound (without the
    rounding slack), united over blocks of BLOCK kernels sorted by best tile as the search does.
    Near 1: the bound prunes nothing and brute force is cheaper."""
    kernels = np.asarray(kernels, np.float32)
    live = preprocess.valid_mask(kernels)
    if not live.any():
        return 1.0
    k = kernels.shape[-1]
    # numpy, not jax: eager jax ops would each compile, costing more than the estimate saves
    x = preprocess.embed(kernels[live], preprocess.hyperplane_basis(k), xp=np)
    reps = np.asarray(tables.reps, np.float64)
    p = x @ reps.T
    lb, best = p.max(axis=1), p.argmax(axis=1)
    caps = np.asarray(tables.caps, np.float64)
    centre, cos_r, sin_r = caps[:, :-2], -caps[:, -2], caps[:, -1]
    always = ~caps.any(axis=1)
    cos_t = np.clip(x @ centre.T, -1.0, 1.0)
    sin_t = np.sqrt(1.0 - cos_t ** 2)
    inside = cos_t >= cos_r  # θ ≤ ρ
    bound = np.where(inside, 1.0, cos_t * cos_r + sin_t * sin_r)
    kept = (bound >= lb[:, None] - TIE_TOL) | always
    per_tile = max(1, tile_m // SUB_M)
    kept_tiles = kept[:, : (kept.shape[1] // per_tile) * per_tile]
    kept_tiles = kept_tiles.reshape(len(x), -1, per_tile).any(axis=2)
    order = np.argsort(best, kind="stable")
    visits = [kept_tiles[order[i:i + BLOCK]].any(axis=0).mean()
              for i in range(0, len(order), BLOCK)]
    return float(np.mean(visits))
