"""The host's ceiling for `python -m dwjax.assign` (bench-only): the whole assignment pipeline
(reading the memmapped shards on reader threads, the device transfer, validation, label and code
lookup, per-part statistics, Parquet writing on the writer thread, the summary) with the device
search replaced by a trivial answer, so what remains is what the host costs per row: how fast a
host could feed an accelerator whose search took no time.

The trivial answer is read from each kernel's own weights (its code index from the bits of one
weight, its dissimilarity, sum and norm from others), not searched: elementwise work on the
devices, and columns that vary like real ones, so that Parquet's encoders and codec do the work
they do on real rows (constant columns would compress to nothing and flatter the writer).

`install()` swaps `nearest.Searcher` for `TrivialSearcher` in the running process; nothing a user
runs calls it. The benchmark runs the stage through `WRAPPER` in a subprocess, which also prints
the seconds spent in `dwjax.assign.run` (the pipeline, without interpreter start and imports) and
the process's peak RSS.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dwjax.model import mesh as mesh_lib
from dwjax.search import nearest

# Runs `python -m dwjax.assign ARGS` with the trivial search, timing `dwjax.assign.run`.
WRAPPER = r"""
import sys, time
from dwjax.perf import host_ceiling
host_ceiling.install()
from dwjax import assign, cli
real_run = assign.run
def timed_run(*args, **kwargs):
    t = time.perf_counter()
    try:
        return real_run(*args, **kwargs)
    finally:
        print("RUN_SECONDS", time.perf_counter() - t, file=sys.stderr)
assign.run = timed_run
sys.argv = ["dwjax.assign"] + sys.argv[1:]
try:
    cli.run_config_stage("assign", assign.main, assign.define_flags)
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("VMHWM_KIB", hwm, file=sys.stderr)
"""


def _trivial_chunk(kernels, r_tiles, basis, tables, m: int):
    """`_assign_chunk`'s outputs without a search: `(idx, dis, ratio, raw_sum, raw_norm)`, each
    `[C]`, from four weights of each kernel; ratio 1 (every kernel live, no host re-check)."""
    del r_tiles, basis, tables
    flat = kernels.reshape(kernels.shape[0], -1).astype(jnp.float32)
    bits = lax.bitcast_convert_type(flat[:, 0], jnp.int32)
    idx = (bits & 0x7FFFFFFF) % m
    dis = jnp.clip(jnp.abs(flat[:, 1]), 0.0, 2.0)
    return (idx.astype(jnp.int32), dis, jnp.ones_like(dis), flat[:, 2], jnp.abs(flat[:, 3]))


@functools.lru_cache(maxsize=None)
def _compiled(mesh, m: int):
    """As `nearest._compiled`: sharded over the mesh's "data" axis, outputs replicated."""
    bat, rep = mesh_lib.batch_sharded(mesh), mesh_lib.replicated(mesh)
    per_device = jax.shard_map(functools.partial(_trivial_chunk, m=m), mesh=mesh,
                               in_specs=(P("data"), P(), P(), P()), out_specs=(P("data"),) * 5)
    return jax.jit(per_device, in_shardings=(bat, rep, rep, rep), out_shardings=(rep,) * 5)


class TrivialSearcher(nearest.Searcher):
    """A `nearest.Searcher` (same setup, streaming, reader threads and chunk shapes) whose
    compiled program answers trivially instead of searching. It stands for a fast accelerator, so
    it streams as one there does: one program sharded over the devices, chunks dispatched ahead
    from the calling thread, not the CPU's per-device lanes (search.lanes), whose threads would
    here only contend for Python's lock with the row building they are meant to overlap."""

    use_lanes = False

    def _program(self, mesh):
        return _compiled(mesh, self.m)


def install() -> None:
    """Makes every `nearest.Searcher` built from now on in this process a `TrivialSearcher`."""
    nearest.Searcher = TrivialSearcher
