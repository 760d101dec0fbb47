"""Benchmark (not a test): nearest_codes on 1M synthetic 7×7 kernels against M = 10,000 reconstructions.

    python launch/bench_assign.py [--n 1000000] [--chunk_size 32768] [--tile_m 64] [--naive_n 100000]
    python launch/bench_assign.py --quick        # smaller N everywhere: about a minute

Prints, for this machine:
  * fp32 GEMM peak: numpy 4096×4096 @ 4096×4096, best of 3, GFLOP/s = 2·4096³/t; with the BLAS numpy
    uses and the OPENBLAS_*/OMP/MKL variables as set, and again in a subprocess with
    OPENBLAS_CORETYPE unset (the variable can pin OpenBLAS to older kernels than the CPU has).
  * ours: nearest_codes end to end (host array in, (idx, dis) out) after a warm-up compile on one
    chunk; kernels/s and effective GFLOP/s = 2·N·48·10⁴/t (the similarity GEMM's flops).
  * naive: what a researcher would write in PyTorch: the full N×M dissimilarity matrix, then
    argmin. At 1M that matrix is 40 GB, so it runs on --naive_n kernels (default 100k: 4 GB for the
    similarities + 4 GB for 1 − sims) in a subprocess; rates are per kernel.
  * peak RSS (VmHWM, see peak_rss_mib) of ours at N = 250k and 1M, each in a fresh subprocess
    reading kernels from a lazy synthetic source (O(chunk) memory), to show memory is flat in N;
    the O(N) outputs (8 bytes per kernel) are the only part that grows.
  * pruned vs brute force, the core only (the compiled chunk function on device-resident chunks,
    no host streaming), at M = 10,000 codes along a decoder-like curve (tests.reference:
    smoothstep between DoG-family templates) for 5×5 and 7×7, on --core_n kernels (70% near the
    curve, 30% random directions): kernels/s, effective GFLOP/s = 2·N·d·M/t (brute force's flops,
    whatever the method did) against the GEMM peak, the ratio, and whether the indices agree. Run
    twice: in this process (jax's default: one CPU device for all cores) and in a child with one
    CPU device per core (XLA_FLAGS=--xla_force_host_platform_device_count), because the pruned
    search's block loop is sequential within a device while brute force's big GEMMs are threaded.
Other processes on the machine skew every number; the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

M, D, K = 10_000, 48, 7
CORE_SIZES = (5, 7)
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
             "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "NVPL_BLAS_DEBUG_CPU_TYPE")


class SyntheticKernels:
    """Lazy `[n, 7, 7]` random unit kernels: rows are generated when sliced (memory O(slice))."""

    def __init__(self, n: int, seed: int = 0):
        self.shape, self.dtype, self.seed = (n, K, K), np.dtype(np.float32), seed

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(len(self))
        return unit_kernels(stop - start, seed=(self.seed, start))


def unit_kernels(n: int, seed=0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, K, K), dtype=np.float32)
    return x / np.linalg.norm(x.reshape(n, -1), axis=1)[:, None, None]


def recon_vectors(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((M, D), dtype=np.float32)


def gemm_peak(reps: int = 3, n: int = 4096) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool and page faults
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def peak_rss_mib() -> float:
    """This process's peak RSS. /proc VmHWM (per address space, so it starts fresh at exec), not
    ru_maxrss: Linux carries the pre-exec high-water mark into ru_maxrss, so a child spawned by a
    process holding 500 MB reports ≥ 500 MB from its first line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def blas_info() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version')} ({cfg.get('openblas configuration', '')})".strip()
    except Exception as e:  # older numpy: no mode="dicts"
        return f"unknown ({e})"


# ------------------------------------------------------------------------------ subprocess modes

def _child_gemm() -> dict:
    return {"gflops": gemm_peak()}


def _child_ours(n: int, chunk_size: int, tile_m: int) -> dict:
    """Peak RSS of one nearest_codes call on a lazy source (after a one-chunk warm-up)."""
    from dwjax import nearest

    recon = recon_vectors()
    imported = peak_rss_mib()
    nearest.nearest_codes(SyntheticKernels(chunk_size, seed=9), recon, chunk_size, tile_m=tile_m)
    before = peak_rss_mib()
    t = _timed(lambda: nearest.nearest_codes(SyntheticKernels(n), recon, chunk_size, tile_m=tile_m))
    return {"seconds": t, "rss_import_mib": imported, "rss_before_mib": before,
            "rss_peak_mib": peak_rss_mib(), "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child_naive(n: int) -> dict:
    """The naive PyTorch version, timed end to end (same preprocessing as ours), and its peak RSS."""
    import torch

    from dwjax import preprocess

    kernels, recon = unit_kernels(n, seed=2), recon_vectors()
    basis = torch.from_numpy(preprocess.hyperplane_basis(K))

    def naive():
        k = torch.from_numpy(kernels).reshape(n, -1)
        k = k - k.mean(dim=1, keepdim=True)
        x = (k / k.norm(dim=1, keepdim=True)) @ basis
        r = torch.nn.functional.normalize(torch.from_numpy(recon), dim=1)
        dis = 1 - x @ r.T  # [n, M]: the full dissimilarity matrix
        val, idx = dis.min(dim=1)
        return idx.numpy(), val.numpy()

    naive()  # warm-up (allocator, threads)
    t = min(_timed(naive) for _ in range(2))
    return {"seconds": t, "rss_peak_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def _child_core(kernel_size: int, n: int, chunk_size: int, reps: int) -> dict:
    """Pruned vs brute force: the compiled chunk function on device-resident chunks (best of reps,
    the two methods interleaved so that load drifts hit both)."""
    import jax

    from dwjax import mesh as mesh_lib, nearest, preprocess
    from tests.reference import curve_kernels, template_curve

    recon = template_curve(kernel_size, M, seed=kernel_size)
    kernels = curve_kernels(recon, n, seed=kernel_size)
    mesh = mesh_lib.data_mesh()
    rep = mesh_lib.replicated(mesh)
    backend = jax.default_backend()
    tile = nearest.default_tile_m(backend)
    r_host = np.asarray(nearest.tiles(recon, tile))
    r_tiles = jax.device_put(r_host, rep)
    tables = jax.device_put(nearest.pruned_tables(r_host), rep)
    basis = jax.device_put(preprocess.hyperplane_basis(kernel_size), rep)
    c = nearest._chunk_rows(n, chunk_size, mesh.size)
    kernels = np.concatenate([kernels, np.zeros((-n % c, *kernels.shape[1:]), np.float32)])
    chunks = [nearest._put(mesh, kernels[s:s + c]) for s in range(0, len(kernels), c)]
    fns = {m: (nearest._compiled(mesh, M, m), None if m == "brute" else tables)
           for m in ("brute", "pruned")}

    def run(method):
        fn, tab = fns[method]
        return jax.block_until_ready([fn(x, r_tiles, basis, tab) for x in chunks])

    idx = {m: np.concatenate([np.asarray(o[0]) for o in run(m)])[:n] for m in fns}  # compiles
    times = {m: [] for m in fns}
    for _ in range(reps):
        for m in fns:
            times[m].append(_timed(lambda: run(m)))
    return {"devices": mesh.size, "backend": backend, "tile_m": tile, "chunk": c,
            "radius": float(tables.radius), "identical": bool(np.array_equal(*idx.values())),
            "choice": nearest.choose_method(backend, n, M, float(tables.radius)),
            **{f"{m}_s": min(t) for m, t in times.items()}}


def report_core(r: dict, kernel_size: int, n: int, peak: float, label: str) -> None:
    d = kernel_size * kernel_size - 1
    line = [f"core {kernel_size}×{kernel_size} (d={d}, M={M:,} curve, N={n:,}, {label}: "
            f"{r['devices']} {r['backend']} device(s), tile_m={r['tile_m']}, chunk={r['chunk']}):"]
    for m in ("brute", "pruned"):
        t = r[f"{m}_s"]
        gf = 2 * n * d * M / t / 1e9
        line.append(f"{m} {t:.3f} s, {n / t:,.0f} kernels/s, {gf:.0f} GFLOP/s effective "
                    f"({gf / peak:.0%} of GEMM peak);")
    line.append(f"pruned/brute = {r['brute_s'] / r['pruned_s']:.2f}×; identical indices: "
                f"{r['identical']}; auto picks {r['choice']} (cap radius {r['radius']:.3f} rad)")
    print(" ".join(line))


def _run_child(mode: str, args: list, env: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--chunk_size", type=int, default=None, help="default: nearest.DEFAULT_CHUNK")
    p.add_argument("--tile_m", type=int, default=None, help="default: nearest.DEFAULT_TILE_M")
    p.add_argument("--naive_n", type=int, default=100_000)
    p.add_argument("--rss_n", default="250000,1000000", help="comma-separated N for the RSS runs")
    p.add_argument("--reps", type=int, default=2, help="timed runs of ours (best is reported)")
    p.add_argument("--core_n", type=int, default=262_144, help="kernels per pruned/brute core run")
    p.add_argument("--core_reps", type=int, default=3, help="timed runs of each core (best)")
    p.add_argument("--quick", action="store_true",
                   help="N=65,536, naive_n=10,000, core_n=65,536, 2 core reps, no RSS runs")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        mode, rest = a._child[0], [int(v) for v in a._child[1:]]
        modes = {"gemm": _child_gemm, "ours": _child_ours, "naive": _child_naive,
                 "core": _child_core}
        print(json.dumps(modes[mode](*rest)))
        return
    if a.quick:
        a.n, a.naive_n, a.core_n, a.core_reps, a.rss_n, a.reps = 65_536, 10_000, 65_536, 2, "", 1

    import jax

    from dwjax import nearest

    chunk = a.chunk_size or nearest.DEFAULT_CHUNK
    tile = a.tile_m or nearest.DEFAULT_TILE_M
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"numpy {np.__version__} BLAS: {blas_info()}")
    print("BLAS env: " + ", ".join(f"{v}={os.environ.get(v, '<unset>')}" for v in BLAS_VARS))

    peak = gemm_peak()
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    peak_unpinned = _run_child("gemm", [], env)["gflops"]
    print(f"fp32 GEMM peak (numpy 4096³, best of 3): {peak:.1f} GFLOP/s as set; "
          f"{peak_unpinned:.1f} GFLOP/s with OPENBLAS_CORETYPE unset")

    recon = recon_vectors()
    kernels = unit_kernels(a.n)
    t0 = time.perf_counter()
    nearest.nearest_codes(kernels[:chunk], recon, chunk, tile_m=tile, log=print)
    print(f"warm-up compile (one chunk of {chunk}): {time.perf_counter() - t0:.2f} s")
    best = min(_timed(lambda: nearest.nearest_codes(kernels, recon, chunk, tile_m=tile))
               for _ in range(a.reps))
    flops = 2 * a.n * D * M
    ours = flops / best / 1e9
    print(f"ours: N={a.n} chunk_size={chunk} tile_m={tile}: {best:.2f} s, {a.n / best:,.0f} kernels/s, "
          f"{ours:.1f} GFLOP/s effective (best of {a.reps})")

    nv = _run_child("naive", [a.naive_n])
    naive_rate = a.naive_n / nv["seconds"]
    naive_gf = 2 * a.naive_n * D * M / nv["seconds"] / 1e9
    print(f"naive torch ({nv['threads']} threads, full {a.naive_n}×{M} matrix then argmin; N={a.naive_n} "
          f"because N={a.n:,} needs {a.n * M * 4 / 1e9:.0f} GB): {nv['seconds']:.2f} s, {naive_rate:,.0f} kernels/s, "
          f"{naive_gf:.1f} GFLOP/s, peak RSS {nv['rss_peak_mib']:,.0f} MiB")
    print(f"ratios: ours/peak = {ours / peak:.0%} (as set), {ours / peak_unpinned:.0%} (CORETYPE unset); "
          f"ours/naive = {(a.n / best) / naive_rate:.1f}× per kernel")

    for n in (int(v) for v in a.rss_n.split(",") if v):
        r = _run_child("ours", [n, chunk, tile])
        print(f"peak RSS ours N={n:>9,}: {r['rss_peak_mib']:,.0f} MiB (after import "
              f"{r['rss_import_mib']:,.0f} MiB, after one-chunk warm-up {r['rss_before_mib']:,.0f} MiB; "
              f"outputs {n * 8 / 2**20:.1f} MiB; lazy source: {n / r['seconds']:,.0f} kernels/s; "
              f"ru_maxrss {r['ru_maxrss_mib']:,.0f} MiB incl. the parent's)")

    per_core = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                    f" --xla_force_host_platform_device_count={os.cpu_count()}").strip())
    for k in CORE_SIZES:
        args = (k, a.core_n, chunk, a.core_reps)
        print(f"load average {os.getloadavg()[0]:.2f}")
        report_core(_child_core(*args), k, a.core_n, peak, "this process")
        report_core(_run_child("core", list(args), per_core), k, a.core_n, peak,
                    "one CPU device per core")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
