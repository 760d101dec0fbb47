"""Assign benchmark (`python -m dwjax.bench --parts=assign`), all measured in one run on N
synthetic 7×7 kernels against M = 10,000 codes decoded by a 7×7 run trained for the purpose:

  command   `python -m dwjax.assign` end to end, as a user runs it (imports, model load, decoding,
            search, row writing, summary), after one warm-up run (compilation and page cache);
            peak RSS (VmHWM) at N and at a smaller N: memory should be flat in N. From the two
            sizes: the command's rate per extra kernel, (N − n)/(t_N − t_n), and its fixed cost
            t_N − N/that rate, set against a bare `python -c "import jax"` (what any command
            using jax pays before its first line)
  search    `nearest.nearest_codes` in this process on the same memmapped kernels and codes,
            compiled: the default method, and brute force vs the pruned search (same answer)
  peak      numpy's fp32 4096³ GEMM in a subprocess with OPENBLAS_CORETYPE/L2_SIZE unset;
            effective GFLOP/s = 2·N·48·10⁴ / time (the similarity GEMM's flops)
  naive     the plain numpy way: the full `[n, M]` dissimilarity matrix, then argmin, on
            `naive_n` kernels (1M would need 40 GB); compared per kernel
  5×5       brute force vs the pruned search with a 5×5 decoder trained on the embedded default
            (`train_5x5_epochs`), on its real kernels repeated to `n_5x5`; skipped when the
            embedded weights are not installed
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from dwjax.io import shards, sources
from dwjax.perf import machine

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
    from dwjax.patterns import templates

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
    npz = os.path.join(tmp, f"{name}.npz")
    np.savez(npz, kernels=kernels)
    data = os.path.join(tmp, f"data_{name}")
    shards.add_sources(data, [sources.npz_source(npz)], log=lambda *_: None)
    os.remove(npz)
    return data


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"assign benchmark: {args[:2]} failed:\n{p.stderr[-3000:]}")
    return p


def _train(tmp: str, env: dict, epochs: int) -> str:
    data = _convert(tmp, "train", synthetic_kernels(20_000, seed=1))
    workdir = os.path.join(tmp, "run")
    _run(["-m", "dwjax.train", "--kernel_size=7", f"--workdir={workdir}", f"--data_dir={data}",
          f"--config.num_epochs={epochs}", "--config.batch_size=256"], env)
    return workdir


def run_command(workdir: str, data: str, env: dict) -> tuple[float, float]:
    """`(wall seconds, peak RSS MiB)` of `python -m dwjax.assign` on fresh assignments."""
    from dwjax.io import workdir as workdir_lib

    shutil.rmtree(workdir_lib.RunDir(workdir).assignments, ignore_errors=True)
    t = time.perf_counter()
    p = _run(["-c", _WRAPPER, f"--workdir={workdir}", f"--data_dir={data}"], env)
    wall = time.perf_counter() - t
    hwm = [line for line in p.stderr.splitlines() if line.startswith("VMHWM_KIB")][0].split()[1]
    return wall, int(hwm) / 1024


def bare_jax_start(env: dict, reps: int = 3) -> float:
    """Seconds of `python -c "import jax; jax.devices()"`: the floor of any jax command."""
    def start():
        _run(["-c", "import jax; jax.devices()"], env)
    return _best(start, reps)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def search_rates(workdir: str, data: str, reps: int = 2) -> dict:
    """Kernels/s of `nearest_codes` (auto, brute, pruned) on the memmapped kernels, compiled."""
    from dwjax.io import workdir as workdir_lib
    from dwjax.model import decoder, restore
    from dwjax.search import nearest

    params, config = restore.load_params(workdir_lib.RunDir(workdir))
    _, recon = decoder.decode_codes(params, config.model.negative_slope, M)
    (shard,) = shards.iter_shards(data, K)
    n = len(shard.kernels)
    out, idx = {}, {}
    for method in ("auto", "brute", "pruned"):
        nearest.nearest_codes(shard.kernels[:nearest.DEFAULT_CHUNK], recon, method=method)
        idx[method] = nearest.nearest_codes(shard.kernels, recon, method=method)[0]
        out[method] = n / _best(lambda: nearest.nearest_codes(shard.kernels, recon,
                                                               method=method), reps)
    lines: list[str] = []
    nearest.nearest_codes(shard.kernels[:nearest.DEFAULT_CHUNK], recon, log=lines.append)
    out["auto_choice"] = " ".join(lines)
    out["identical"] = bool(np.array_equal(idx["brute"], idx["pruned"])
                            and np.array_equal(idx["auto"], idx["brute"]))
    out["recon"] = recon
    return out


def pruned_vs_brute_5x5(tmp: str, env: dict, epochs: int, n: int,
                        reps: int = 2) -> dict | None:
    """Kernels/s of both methods (same answers) with a trained 5×5 decoder on real kernels, or
    None without the embedded default's weights."""
    from dwjax.errors import UserError
    from dwjax.io import workdir as workdir_lib
    from dwjax.model import decoder, restore
    from dwjax.search import nearest

    data = os.path.join(tmp, "data_5x5")
    try:
        shards.add_sources(data, sources.embedded_sources(), log=lambda *_: None)
    except UserError:
        return None
    workdir = os.path.join(tmp, "run_5x5")
    _run(["-m", "dwjax.train", "--kernel_size=5", f"--workdir={workdir}", f"--data_dir={data}",
          f"--config.num_epochs={epochs}"], env)
    params, config = restore.load_params(workdir_lib.RunDir(workdir))
    _, recon = decoder.decode_codes(params, config.model.negative_slope, M)
    real = np.concatenate([np.asarray(s.kernels) for s in shards.iter_shards(data, 5)])
    kernels = np.resize(real, (n, 5, 5))  # the real kernels, repeated
    out, idx = {"real_kernels": len(real)}, {}
    for method in ("brute", "pruned"):
        search = nearest.Searcher(recon, 5, method=method)
        idx[method] = search(kernels)[0]
        out[method] = n / _best(lambda: search(kernels), reps)
    out["identical"] = bool(np.array_equal(idx["brute"], idx["pruned"]))
    return out


def naive_rate(recon: np.ndarray, n: int, reps: int = 2) -> tuple[float, float]:
    """Kernels/s and peak extra MiB of the plain numpy way: full `[n, M]` matrix, argmin."""
    from dwjax.model import preprocess

    kernels = synthetic_kernels(n, seed=3)
    basis = np.asarray(preprocess.hyperplane_basis(K), np.float32)
    r = np.asarray(recon, np.float32)

    def naive():
        k = kernels.reshape(n, -1)
        k = k - k.mean(axis=1, keepdims=True)
        x = (k / np.linalg.norm(k, axis=1, keepdims=True)) @ basis
        rn = r / np.linalg.norm(r, axis=1, keepdims=True)
        dis = 1 - x @ rn.T  # [n, M]: the whole dissimilarity matrix
        return dis.argmin(axis=1), dis.min(axis=1)

    naive()
    return n / _best(naive, reps), 2 * n * M * 4 / 2**20


def run(n: int = 1_000_000, small_n: int = 250_000, naive_n: int = 20_000,
        train_epochs: int = 10, train_5x5_epochs: int = 50, n_5x5: int = 500_000,
        tmp: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The benchmark's entry: the command vs the search vs the GEMM peak vs the naive way."""
    d = tempfile.mkdtemp(prefix="dwjax-bench-assign-", dir=tmp)
    env = dict(os.environ, DWJAX_HOME=os.path.join(d, "home"))
    try:
        workdir = _train(d, env, train_epochs)
        big = _convert(d, "big", synthetic_kernels(n))
        small = _convert(d, "small", synthetic_kernels(small_n, seed=2))
        run_command(workdir, small, env)  # warm-up: the compilation cache, the page cache
        peak = machine.gemm_peak_gflops()
        wall, rss_big = run_command(workdir, big, env)
        wall_small, rss_small = run_command(workdir, small, env)
        bare = bare_jax_start(env)
        search = search_rates(workdir, big)
        naive, naive_mib = naive_rate(search.pop("recon"), naive_n)
        five = pruned_vs_brute_5x5(d, env, train_5x5_epochs, n_5x5) if n_5x5 else None
    finally:
        shutil.rmtree(d, ignore_errors=True)
    e2e = n / wall
    gflops = 2 * n * D * M / wall / 1e9
    per_kernel = (n - small_n) / max(wall - wall_small, 1e-9)  # the fixed cost cancels
    fixed = wall - n / per_kernel
    log(f"assign: command {wall:.2f} s for {n:,} 7x7 kernels x {M:,} codes "
        f"({e2e:,.0f} kernels/s, {gflops:.0f} GFLOP/s); search {search['auto']:,.0f} kernels/s; "
        f"GEMM peak {peak:.0f} GFLOP/s")
    if five:
        five_row = machine.row("pruned vs brute force, trained 5x5",
                                     five["pruned"], five["brute"], "kernels/s",
                                     five["pruned"] / five["brute"], ">= 2x")
    else:
        five_row = machine.row("pruned vs brute force, trained 5x5",
                                     None, None, "kernels/s", None,
                                     "skipped (embedded default not installed)")
    rows = [
        machine.row("command end to end vs search alone", e2e, search["auto"], "kernels/s",
                          e2e / search["auto"], ">= 85%"),
        machine.row("per extra kernel vs search alone", per_kernel, search["auto"],
                          "kernels/s", per_kernel / search["auto"], percent=True),
        machine.row("command fixed cost vs bare jax start", fixed, bare, "s", fixed / bare),
        machine.row("command end to end vs fp32 GEMM peak", gflops, peak, "GFLOP/s",
                          gflops / peak, ">= 60%"),
        machine.row(f"search vs naive numpy, n={naive_n:,}", search["auto"],
                          naive, "kernels/s", search["auto"] / naive),
        machine.row("pruned vs brute-force search, 7x7", search["pruned"], search["brute"],
                          "kernels/s", search["pruned"] / search["brute"], ">= 2x"),
        five_row,
        machine.row(f"command peak RSS, N={n:,} vs {small_n:,}", rss_big, rss_small,
                          "MiB", rss_big / rss_small, "<= 1.3x"),
    ]
    figures = {"n": n, "small_n": small_n, "naive_n": naive_n, "codes": M, "dim": D,
               "command_s": wall, "command_small_s": wall_small, "command_kernels_per_s": e2e,
               "command_per_extra_kernel_per_s": per_kernel, "command_fixed_s": fixed,
               "bare_jax_start_s": bare,
               "command_gflops": gflops, "gemm_peak_gflops": peak,
               "search_kernels_per_s": {k: search[k] for k in ("auto", "brute", "pruned")},
               "search_choice": search["auto_choice"], "methods_agree": search["identical"],
               "naive_kernels_per_s": naive, "naive_matrix_mib": naive_mib,
               "rss_mib": {str(n): rss_big, str(small_n): rss_small}, "pruned_5x5": five}
    return {"benchmark": "assign", "skipped": None, "rows": rows, "figures": figures,
            "seconds": {"command": wall, "command_small": wall_small,
                        "search": n / search["auto"]}}
