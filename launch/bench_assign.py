"""Benchmark (not a test): nearest_codes on 1M synthetic 7×7 kernels against M = 10,000 reconstructions.

    python launch/bench_assign.py [--n 1000000] [--chunk_size 32768] [--tile_m 64] [--naive_n 100000]

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
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        mode, rest = a._child[0], [int(v) for v in a._child[1:]]
        print(json.dumps({"gemm": _child_gemm, "ours": _child_ours, "naive": _child_naive}[mode](*rest)))
        return

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
    nearest.nearest_codes(kernels[:chunk], recon, chunk, tile_m=tile)
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
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
