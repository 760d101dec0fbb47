"""Benchmark (not a test): `python -m dwjax.assign` end to end, as a user runs it, on N synthetic
7×7 kernels (one .npz converted to shards), against the core search on the same kernels and this
machine's fp32 GEMM peak, all measured in this one run.

    python launch/bench_assign_e2e.py [--n 1000000] [--small_n 250000] [--quick]

Prints: the command's wall time (imports, model load, decoding, search, row writing, summary), its
kernels/s and effective GFLOP/s (2·N·48·10⁴ / wall), the core search (`nearest.nearest_codes` on
the same memmapped kernels and decoded codes, in-process, compiled) and the ratio e2e/core, the
ratio to the GEMM peak (numpy 4096³ with OPENBLAS_CORETYPE unset, in a subprocess), and the
command's peak RSS (VmHWM) at N and at small_n. Setup (training a 7×7 decoder on DoG-family
kernels, writing and converting the kernels, one warm-up run for the compilation cache) is not
timed. Other load skews every figure; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

K, D, M = 7, 48, 10_000
# Runs the stage's main as `python -m dwjax.assign` does, then prints the process's VmHWM.
_WRAPPER = r"""
import runpy, sys
sys.argv = ["dwjax.assign"] + sys.argv[1:]
try:
    runpy.run_module("dwjax.assign", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("VMHWM_KIB", hwm, file=sys.stderr)
"""


def synthetic_kernels(n: int, seed: int = 0) -> np.ndarray:
    """`[n, 7, 7]` float32: DoG-family kernels with noise (most near the decoder's curve, as
    trained kernels are) and a fifth pure noise."""
    from dwjax import templates

    rng = np.random.default_rng(seed)
    base = templates.sample_dog_init(min(n, 50_000), K, rng)
    out = np.empty((n, K, K), np.float32)
    for a in range(0, n, len(base)):
        b = min(a + len(base), n)
        noise = rng.standard_normal((b - a, K, K)).astype(np.float32)
        scale = rng.uniform(0.02, 0.4, (b - a, 1, 1)).astype(np.float32)
        out[a:b] = base[: b - a] + scale * noise
    out[::5] = rng.standard_normal((len(out[::5]), K, K))
    return out


def _convert(tmp: str, name: str, kernels: np.ndarray) -> str:
    from dwjax import convert, sources

    npz = os.path.join(tmp, f"{name}.npz")
    np.savez(npz, kernels=kernels)
    data = os.path.join(tmp, f"data_{name}")
    convert.convert(data, [sources.npz_source(npz)], log=lambda *_: None)
    os.remove(npz)
    return data


def _train(tmp: str) -> str:
    from dwjax import train
    from dwjax.configs import train as train_configs

    data = _convert(tmp, "train", synthetic_kernels(20_000, seed=1))
    config = train_configs.get_config("7")
    config.num_epochs, config.batch_size = 10, 256
    workdir = os.path.join(tmp, "run")
    train.train_and_evaluate(config, workdir, data, log=lambda *_: None)
    return workdir


def run_command(workdir: str, data: str, env: dict) -> tuple[float, float, str]:
    """`(wall seconds, peak RSS MiB, stdout)` of `python -m dwjax.assign` on fresh assignments."""
    shutil.rmtree(os.path.join(workdir, "assignments"), ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAPPER, f"--workdir={workdir}",
                        f"--data_dir={data}"], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    hwm = [l for l in p.stderr.splitlines() if l.startswith("VMHWM_KIB")][0].split()[1]
    return wall, int(hwm) / 1024, p.stdout


def core_rate(workdir: str, data: str) -> tuple[float, str]:
    """Kernels/s of the compiled core search on the same memmapped kernels and decoded codes."""
    from dwjax import mesh, model, nearest, shards, workdir as workdir_lib

    m, _ = workdir_lib.load_model(workdir_lib.RunDir(workdir))
    _, recon = model.decode_codes(m, M)
    (shard,) = shards.iter_shards(data, K)
    local = mesh.local_mesh()
    nearest.nearest_codes(shard.kernels[:nearest.DEFAULT_CHUNK], recon, mesh=local)  # compile
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        nearest.nearest_codes(shard.kernels, recon, mesh=local)
        best = min(best, time.perf_counter() - t)
    method = getattr(nearest, "choose_method", lambda *a: "brute")
    try:
        name = method(local.devices.flat[0].platform, len(shard.kernels), M)
    except TypeError:
        name = "default"
    return len(shard.kernels) / best, str(name)


def gemm_peak_unpinned() -> float:
    code = ("import numpy as np, time\n"
            "a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)\n"
            "b = np.random.default_rng(1).standard_normal((4096, 4096), dtype=np.float32)\n"
            "a @ b\nbest = 1e9\n"
            "for _ in range(3):\n    t = time.perf_counter(); a @ b\n"
            "    best = min(best, time.perf_counter() - t)\n"
            "print(2 * 4096 ** 3 / best / 1e9)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.strip())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--small_n", type=int, default=250_000)
    p.add_argument("--quick", action="store_true", help="N = 200k, small N = 50k")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.small_n = 200_000, 50_000
    import jax

    tmp = tempfile.mkdtemp(prefix="dwjax-bench-assign-")
    env = dict(os.environ, DWJAX_HOME=os.path.join(tmp, "home"))
    try:
        workdir = _train(tmp)
        big = _convert(tmp, "big", synthetic_kernels(a.n))
        small = _convert(tmp, "small", synthetic_kernels(a.small_n, seed=2))
        run_command(workdir, small, env)  # warm-up: the compilation cache, the page cache
        print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on "
              f"{jax.devices()[0].device_kind} x{jax.device_count()}, load average "
              f"{os.getloadavg()[0]:.2f}")
        peak = gemm_peak_unpinned()
        wall, rss_big, out = run_command(workdir, big, env)
        _, rss_small, _ = run_command(workdir, small, env)
        core, method = core_rate(workdir, big)
        e2e = a.n / wall
        flops = 2 * a.n * D * M
        result = {
            "n": a.n, "wall_s": wall, "e2e_kernels_per_s": e2e, "core_kernels_per_s": core,
            "core_method": method, "e2e_over_core": e2e / core,
            "e2e_gflops": flops / wall / 1e9, "gemm_peak_gflops": peak,
            "e2e_over_peak": flops / wall / 1e9 / peak, "rss_mib": {str(a.n): rss_big,
                                                                   str(a.small_n): rss_small},
            "rss_ratio": rss_big / rss_small, "load_average": os.getloadavg()[0]}
        print(out.strip().splitlines()[-1])
        print(f"python -m dwjax.assign, N={a.n:,} 7x7 kernels x {M:,} codes: {wall:.2f} s wall, "
              f"{e2e:,.0f} kernels/s, {result['e2e_gflops']:.0f} GFLOP/s effective")
        print(f"core search ({method}), same kernels, compiled: {core:,.0f} kernels/s")
        print(f"fp32 GEMM peak (numpy 4096³, OPENBLAS_CORETYPE unset): {peak:.0f} GFLOP/s")
        print(f"ratios: end to end / core = {e2e / core:.0%} (target >= 85%); end to end / GEMM "
              f"peak = {result['e2e_over_peak']:.0%} (target >= 60%); peak RSS {rss_big:,.0f} MiB "
              f"at {a.n:,} / {rss_small:,.0f} MiB at {a.small_n:,} = {rss_big / rss_small:.2f}x "
              f"(target <= 1.3x); load average {result['load_average']:.2f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
