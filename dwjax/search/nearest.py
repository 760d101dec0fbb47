"""Assignment core (paper §4.2): each kernel's nearest reconstruction by cosine dissimilarity.

Given decoded reconstructions `recon [M, d]` (hyperplane coordinates, d = k*k-1, M = 10,000 in the
paper) and raw kernels `[N, k, k]`, find for each kernel

    idx[i] = argmax_j cos(embed(kernel_i), recon_j)      dis[i] = 1 − max_j cos(…)

where `embed` is preprocess.embed (centre, normalise, hyperplane basis), so `dis` is the
mean-centred cosine dissimilarity of the pixel kernels. Two methods give the same answer
(`method=`; `choose_method` picks one per backend, M and curve shape). Their device programs are in
dwjax/search/device_programs.py; `python -m dwjax.bench` times them (dwjax/perf/assign_speed.py).

Tie rule (both): the lowest index whose float32 similarity is ≥ S − TIE_TOL, S the largest one
(TIE_TOL = 2⁻²², ~2 float32 ulps at 1.0). It does not depend on how M is tiled; below float32
rounding "the" argmax is not defined anyway.

**brute**:
  * XLA:CPU fuses `max(X @ Rᵀ, axis=1)` into one kernel that never writes the `[C, M]` similarity
    matrix; `argmax` (a variadic reduce) does not fuse: it materialises the matrix and is much
    slower. So M is cut into tiles of `tile_m` rows and a `fori_loop` runs one fused dot+max per
    tile (`TILE_M`: small tiles pay per-step overhead, large ones get a slower microkernel).
  * The loop visits tiles last to first, keeping (S, first tile with maximum ≥ S − TIE_TOL): a tile
    within TIE_TOL of the running maximum replaces the held one, and one that raises the maximum
    qualifies itself and lies lower, so the held tile is always the lowest qualifying: O(1) state.
  * Refinement: kernels sorted by winning tile, then per block of BLOCK kernels one GEMM per window
    of a few tiles covering the block's tiles (one or two), first row ≥ S − TIE_TOL. A per-kernel
    gather of its tile (a batched matrix-vector product) would be slower and round differently.

**pruned** (exact; for rows along a smooth curve, as a decoder's codes are): a sub-tile of `SUB_M`
consecutive rows lies in a small spherical cap (unit centre c, angular radius ρ, computed on the
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
flight so host reads, and whatever the caller does with a chunk (`Searcher.stream`), overlap
compute. On a CPU with several devices of this process, each device instead runs whole chunks on
its own lane (search.lanes), so no device waits for another.
Memory is O(chunk_size·(k² + M/tile_m) + M·d), flat in N, plus the two O(N) outputs
(8 bytes per kernel) of `nearest_codes`; `Searcher.stream` yields chunks instead. Every dot
product is float32 at HIGHEST precision (preprocess.PRECISION); bfloat16 does not make the CPU's
fused dot+max any faster.

Dead kernels are screened in the jit with a float32 norm ratio; only rows near the threshold go
through preprocess.valid_mask (float64, host), so the verdict is exactly valid_mask's without a
float64 host pass over every kernel. Dead kernels (valid_mask False: constant or all-zero) get
`idx = −1` and `dis = 1.0` (what a zero vector's cosine gives: orthogonal to everything) — never
NaN, per preprocess's convention; callers filter on `idx >= 0`. `dis` is clipped to [0, 2]
(float32 rounding can make 1 − cos slightly negative for an exact match).
"""
from __future__ import annotations

import collections
import functools
import itertools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dwjax.io import shards
from dwjax.model import mesh as mesh_lib
from dwjax.model import preprocess
from dwjax.search import chunks, lanes
from dwjax.search.method_choice import (  # noqa: F401 (part of this module's API)
    PRUNED_MAX_RADIUS, PRUNED_MAX_VISITS, PRUNED_MIN_M, PRUNED_SLOW_JAX, choose_method,
    pruned_visit_fraction)
from dwjax.search.device_programs import (  # TIE_TOL: part of this module's API
    BLOCK, SUB_M, TIE_TOL, PrunedTables, nearest_block, pruned_search, pruned_tables,  # noqa: F401
    tiles)

DEFAULT_CHUNK = 32768
# Rows per tile, per backend: on CPU the best of the sizes tried (`python -m dwjax.bench`); 128 is
# the TPU MXU / GPU tensor-core width, not yet tried on an accelerator.
TILE_M = {"cpu": 64, "gpu": 128, "tpu": 128}
DEFAULT_TILE_M = TILE_M["cpu"]
# fori_loop unroll of the brute-force tile loop: fewer loop-carried selects between fused calls.
UNROLL = 4
DEAD_DISSIMILARITY = 1.0
METHODS = ("auto", "brute", "pruned")
# Rows per device of one compiled call: with ≥ 2 rows XLA:CPU runs every GEMM through its blocked
# kernel; a 1-row product takes a matrix-vector path that rounds differently (see docstring).
MIN_DEVICE_ROWS = 8


class Chunk(NamedTuple):
    """One compiled call's answers for rows `[start, start + n)` of the kernels searched."""
    start: int
    idx: np.ndarray       # [n] int32 index into recon, −1 for a dead kernel
    dis: np.ndarray       # [n] float32 1 − max cosine, DEAD_DISSIMILARITY for a dead kernel
    raw_sum: np.ndarray   # [n] float32 sum of the raw kernel's weights
    raw_norm: np.ndarray  # [n] float32 L2 norm of the raw kernel


# ------------------------------------------------------------------------------------ per chunk

def _assign_chunk(kernels, r_tiles, basis, tables, m: int, method: str, unroll: int = 1):
    """`[C, k, k]` raw kernels → `(idx, dis, ratio, raw_sum, raw_norm)`, each `[C]` (idx int32, the
    rest float32).

    `ratio` = centred norm / raw norm, the dead-kernel screen (see `_valid`); 0 (dead) for a
    negligible kernel (max |w| below preprocess.DEAD_ABSOLUTE_MAX: an exact float32 test).
    `raw_sum` and `raw_norm` (preprocess.raw_statistics) come with it: the rows' statistics cost
    nothing here and would cost a pass over every kernel on the host.
    `tables` is None for brute force.
    """
    x = preprocess.embed(kernels, basis)
    if method == "pruned":
        best, row = pruned_search(x, r_tiles, tables)
        idx = jnp.minimum(row, m - 1).astype(jnp.int32)
    else:
        idx, best = nearest_block(x, r_tiles, m, unroll)
    flat = kernels.reshape(kernels.shape[0], -1).astype(jnp.float32)
    total, raw, peak = preprocess.raw_statistics(kernels)
    cn = jnp.linalg.norm(flat - jnp.mean(flat, axis=1, keepdims=True), axis=1)
    big = peak >= preprocess.DEAD_ABSOLUTE_MAX
    ratio = jnp.where(big, cn / jnp.where(big, raw, 1.0), 0.0)
    return idx, jnp.clip(1.0 - best, 0.0, 2.0), ratio, total, raw


def _valid(ratio: np.ndarray, host: np.ndarray) -> np.ndarray:
    """preprocess.valid_mask's exact verdict, cheaply: the float32 ratio decides every row more
    than 2× away from the threshold (its float32 error is a few % of the threshold at most: a mean
    that is off by a few ulps of |mean|); the float64 host function decides the rest. Running
    valid_mask on every row instead would be a float64 host pass over every kernel, competing with
    the search for the cores."""
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
                               out_specs=(P("data"),) * 5)
    return jax.jit(per_device, in_shardings=(bat, rep, rep, rep), out_shardings=(rep,) * 5)


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
    kernel's answer does not depend on how a job was cut into calls. `sample` (`[n, k, k]`, some of
    the job's kernels) lets "auto" check that the pruned search would actually skip tiles.
    `readers` threads read the next chunks ahead (0: in the calling thread).
    """

    use_lanes = True  # the per-device lanes where they apply (a subclass may stream sharded)

    def __init__(self, recon, kernel_size: int, mesh: Mesh | None = None, *,
                 method: str = "auto", tile_m: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK, inflight: int = 2, fixed_shape: bool = False,
                 sample=None, readers: int = 1, log=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        k = kernel_size
        recon = np.asarray(recon, np.float32)
        if recon.ndim != 2 or recon.shape[1] != k * k - 1 or len(recon) == 0:
            raise ValueError(f"recon must be [M, {k * k - 1}] with M > 0; got {recon.shape}")
        self.k, self.m, self.chunk_size, self.inflight = k, len(recon), chunk_size, inflight
        self.fixed_shape, self.readers = fixed_shape, readers
        self.mesh = mesh = mesh_lib.data_mesh() if mesh is None else mesh
        backend = mesh.devices.flat[0].platform
        self.tile_m = tile_m = default_tile_m(backend) if tile_m is None else int(tile_m)
        rep = mesh_lib.replicated(mesh)
        r_host = np.asarray(tiles(recon, tile_m))  # the tables are built from it on the host
        self.r_tiles = jax.device_put(r_host, rep)
        tables = None
        if method == "auto":
            method = choose_method(backend, 0, self.m)
            if method == "pruned":
                tables = pruned_tables(r_host)
                radius = float(tables.radius)
                visits = (None if sample is None or radius >= PRUNED_MAX_RADIUS
                          else pruned_visit_fraction(tables, sample, tile_m))
                method = choose_method(backend, 0, self.m, radius, visits)
                why = f"median cap radius {radius:.3f} rad"
                if visits is not None:
                    why += f", {visits:.0%} of tiles visited on a sample of {len(sample)} kernels"
            elif backend == "cpu" and jax.__version__ in PRUNED_SLOW_JAX:
                why = f"jax {jax.__version__}'s XLA:CPU runs the pruned search slowly"
            else:
                why = f"backend {backend}, M = {self.m}"
            if log is not None:
                log(f"nearest-code search: {method} ({why}; tile_m = {tile_m}, "
                    f"{mesh.size} device(s))")
        if method == "pruned" and tables is None:
            tables = pruned_tables(r_host)
        self.method, self.backend = method, backend
        self.tables = None if method == "brute" else jax.device_put(tables, rep)
        self.basis = jax.device_put(preprocess.hyperplane_basis(k), rep)
        self.fn = self._program(mesh)
        # CPU, several devices of this process: each runs whole chunks on its own (search.lanes)
        self.lanes = [self._lane(d) for d in mesh.devices.flat] if (
            self.use_lanes and backend == "cpu" and mesh.size > 1
            and all(d.process_index == jax.process_index() for d in mesh.devices.flat)) else None

    def _program(self, mesh: Mesh):
        """The jitted chunk function on `mesh` (`_compiled`; the host-ceiling bench swaps it)."""
        return _compiled(mesh, self.m, self.method)

    def _lane(self, device) -> tuple:
        """One device's `(mesh, program, r_tiles, basis, tables)`, the constants on it."""
        mesh = Mesh(np.array([device]), ("data",))
        rep = mesh_lib.replicated(mesh)
        tables = None if self.tables is None else jax.device_put(self.tables, rep)
        return (mesh, self._program(mesh), jax.device_put(self.r_tiles, rep),
                jax.device_put(self.basis, rep), tables)

    def __call__(self, kernels) -> tuple[np.ndarray, np.ndarray]:
        """`[N, k, k]` → `(idx [N] int32, dis [N] float32)`, as `nearest_codes`."""
        n = len(kernels)
        idx = np.empty(n, np.int32)
        dis = np.empty(n, np.float32)
        for chunk in self.stream(kernels):
            idx[chunk.start:chunk.start + len(chunk.idx)] = chunk.idx
            dis[chunk.start:chunk.start + len(chunk.idx)] = chunk.dis
        return idx, dis

    def stream(self, kernels, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Rows `[start, stop)` of `kernels [N, k, k]`, one `Chunk` per compiled call, in order
        (`stream_segments` with one segment)."""
        for _, chunk in self.stream_segments([(kernels, start, stop)]):
            yield chunk

    def stream_segments(self, spans: Sequence[tuple]) -> Iterator[tuple[int, Chunk]]:
        """The rows of every `(kernels [N, k, k], start, stop)` span, in order, as
        `(span index, Chunk)`: a compiled call's rows, or the part of them in one span (calls are
        packed across spans: search.chunks).

        `inflight` calls are dispatched ahead of the one returned, so the devices go on searching
        while the caller writes a chunk's rows. Memory is O(chunk), whatever N: a read-only
        memmap's searched rows are released (shards.release_pages).
        """
        k = self.k
        segs = chunks.segments(spans)
        n = sum(s.stop - s.start for s in segs)
        if n == 0:
            return
        # A job smaller than a chunk per lane is cut so every lane gets one (a fixed shape stays
        # whole: its rows must not depend on the job's size).
        per_call = n if self.lanes is None else -(-n // len(self.lanes))
        c = _chunk_rows(self.chunk_size if self.fixed_shape else per_call, self.chunk_size,
                        self.mesh.size)

        def answers(pieces, host, out) -> Iterator[tuple[int, Chunk]]:
            rows = pieces[-1].at + pieces[-1].stop - pieces[-1].start
            i_c, d_c, ratio, raw_sum, raw_norm = (np.asarray(o)[:rows] for o in out)
            valid = _valid(ratio, host[:rows])
            idx = np.where(valid, i_c, -1).astype(np.int32)
            dis = np.where(valid, d_c, DEAD_DISSIMILARITY).astype(np.float32)
            for p in pieces:
                shards.release_pages(segs[p.segment].kernels, p.start, p.stop)
                at = slice(p.at, p.at + p.stop - p.start)
                yield p.segment, Chunk(p.start, idx[at], dis[at], raw_sum[at], raw_norm[at])

        if self.lanes is not None:
            def lane(mesh, fn, r_tiles, basis, tables):
                def start(pieces: list[chunks.Piece]):
                    host = chunks.read(segs, pieces, c, k)
                    out = fn(_put(mesh, host), r_tiles, basis, tables)  # queued on its device
                    return lambda: (pieces, host, [np.asarray(o) for o in out])
                return start

            runs = [lane(*x) for x in self.lanes]
            for result in lanes.in_order(chunks.plan(segs, c), runs,
                                         ahead=len(self.lanes) * (self.inflight + 1)):
                yield from answers(*result)
            return

        pending: collections.deque = collections.deque()

        def read(pieces: list[chunks.Piece]) -> tuple[list[chunks.Piece], np.ndarray]:
            return pieces, chunks.read(segs, pieces, c, k)

        plans = chunks.plan(segs, c)
        with chunks.Readers(self.readers) as readers:
            ahead = collections.deque(readers.submit(read, p)
                                      for p in itertools.islice(plans, self.inflight + 1))
            while ahead:
                pieces, host = ahead.popleft().result()
                for nxt in itertools.islice(plans, 1):
                    ahead.append(readers.submit(read, nxt))
                pending.append((pieces, host, self.fn(_put(self.mesh, host), self.r_tiles,
                                                      self.basis, self.tables)))
                if len(pending) > self.inflight:
                    yield from answers(*pending.popleft())
        while pending:
            yield from answers(*pending.popleft())
