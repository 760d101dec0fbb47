"""The arithmetic a nearest-code search really does, counted in GEMM flops (for
`python -m dwjax.bench --parts=assign`).

Brute force multiplies every kernel by every code: 2·N·d·M flops, the "brute-force-equivalent"
figure the benchmark divides by wall time. The pruned search does less, and how much less depends
on the kernels; `pruned_gemm_flops` counts it on the kernels the benchmark timed, through the same
compiled program at the same chunk shape, with one change made only while it is traced: the
per-block window loop (`device_programs._window_loop`) is replaced by one that counts the windows
it would visit (the same loop control, no GEMM) and returns the count as the block's first row.
What the search runs outside that loop is counted from its shapes:

  reps     one `[C, d] × [d, T_pad]` GEMM per chunk of C kernels (each kernel's lower bound)
  caps     one `[B, d+2] × [d+2, S_pad]` GEMM per block of B kernels (the sub-tiles it needs)
  windows  one `[B, d] × [d, window·tile_m]` GEMM per window a block visits

The embedding (`[C, k²] × [k², d]`, the same for both methods and small next to the search) and
non-GEMM work (sorting, maxima, the lowest-row pass) are not counted.
"""
from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dwjax.model import mesh as mesh_lib
from dwjax.search import device_programs, nearest


def brute_equivalent_flops(n: int, d: int, m: int) -> float:
    """2·N·d·M: the similarity GEMM of every kernel against every code."""
    return 2.0 * n * d * m


def count_windows(need, window: int) -> jax.Array:
    """How many windows `device_programs._window_loop` visits for one block's `need [T]`: the
    same loop control (highest needed tile first, `window` tiles per step, never revisiting),
    without the GEMMs."""
    n_tiles = need.shape[0]
    window = min(window, n_tiles)
    iota = lax.iota(jnp.int32, n_tiles)

    def body(state):
        h, count = state
        start = jnp.maximum(h - window + 1, 0)
        return jnp.max(jnp.where(need & (iota < start), iota, -1)), count + 1

    h0 = jnp.max(jnp.where(need, iota, -1))
    return lax.while_loop(lambda s: s[0] >= 0, body, (h0, jnp.zeros((), jnp.int32)))[1]


def _counting_window_loop(xb, need, r_tiles, window: int):
    """In place of `_window_loop`: `(best, row)` with the block's window count as its first
    kernel's row and 0 elsewhere, so the rows of a chunk sum to its windows. A block's first
    kernel (after the search's sort) is a zero kernel only when the whole block is, and such a
    block visits nothing."""
    count = count_windows(need, window)
    first = lax.iota(jnp.int32, xb.shape[0]) == 0
    return jnp.zeros_like(xb[:, 0]), jnp.where(first, count, 0)


def pruned_gemm_flops(kernels, recon, chunk_size: int = nearest.DEFAULT_CHUNK) -> dict:
    """The GEMM flops `nearest.nearest_codes(kernels, recon, method="pruned", chunk_size=…)`
    does, by kind (`reps`, `caps`, `windows`), with `total`, the windows visited and the share
    of brute force's similarity products they amount to (`visited_fraction`)."""
    k = int(round(np.sqrt(np.prod(kernels.shape[1:]))))
    search = nearest.Searcher(recon, k, method="pruned", chunk_size=chunk_size)
    mesh, m = search.mesh, search.m
    n_tiles, tile_m, d = search.r_tiles.shape
    n = len(kernels)
    c = nearest._chunk_rows(n, chunk_size, mesh.size)  # the shape the timed search runs at
    per_device = c // mesh.size
    block = device_programs._blocks(per_device)
    window = min(device_programs.WINDOW_TILES, n_tiles)
    # a fresh jit (not the cached real program), traced while the window loop is replaced
    fn = nearest._compiled.__wrapped__(mesh, m, "pruned", nearest.UNROLL)
    windows = 0
    with mock.patch.object(device_programs, "_window_loop", _counting_window_loop):
        for a in range(0, n, c):
            host = np.asarray(kernels[a:min(a + c, n)], np.float32).reshape(-1, k, k)
            if len(host) < c:
                host = np.concatenate([host, np.zeros((c - len(host), k, k), np.float32)])
            out = fn(mesh_lib.shard_batch(mesh, host), search.r_tiles, search.basis,
                     search.tables)
            windows += int(np.asarray(out[0], np.int64).sum())
    chunks = -(-n // c)
    t_pad, s_pad = search.tables.reps.shape[0], search.tables.caps.shape[0]
    flops = {"reps": 2.0 * chunks * c * d * t_pad,
             "caps": 2.0 * chunks * c * (d + 2) * s_pad,
             "windows": 2.0 * windows * block * window * tile_m * d}
    flops["total"] = sum(flops.values())
    blocks = chunks * c // block
    return {"flops": flops, "windows": windows, "blocks": blocks, "block": block,
            "window_rows": window * tile_m, "chunk": c,
            "visited_fraction": windows * window * tile_m / (blocks * n_tiles * tile_m)}
