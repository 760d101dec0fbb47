"""Kernel sets and commands for the assign benchmark (dwjax.perf.assign_speed): synthetic kernels
written as one `.npz` block by block and converted by `python -m dwjax.convert --kernels_npz`,
decoders trained by `python -m dwjax.train`, and `python -m dwjax.assign` run in a fresh process
(its wall time, peak RSS and output), with a digest of the rows it wrote. Everything goes under a
temporary directory the caller owns.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from typing import Iterator

import numpy as np

K = 7
# Synthetic kernels are made and written this many at a time: memory does not grow with N.
_BLOCK = 50_000
# Runs the stage's main as `python -m dwjax.assign` does, then prints the process's VmHWM.
WRAPPER = r"""
import runpy, sys
sys.argv = ["dwjax.assign"] + sys.argv[1:]
try:
    runpy.run_module("dwjax.assign", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("VMHWM_KIB", hwm, file=sys.stderr)
"""


# ----------------------------------------------------------------------------------- kernel sets

def synthetic_blocks(n: int, seed: int = 0, k: int = K) -> Iterator[np.ndarray]:
    """`[≤ _BLOCK, k, k]` float32 blocks of `n` kernels: DoG-family kernels with noise (most near
    a decoder's curve, as trained kernels are), every fifth kernel pure noise."""
    from dwjax.patterns import templates

    rng = np.random.default_rng(seed)
    base = templates.sample_dog_init(min(n, _BLOCK), k, rng)
    for a in range(0, n, _BLOCK):
        b = min(a + _BLOCK, n)
        noise = rng.standard_normal((b - a, k, k)).astype(np.float32)
        scale = rng.uniform(0.02, 0.4, (b - a, 1, 1)).astype(np.float32)
        out = base[: b - a] + scale * noise
        first = -a % 5  # global index ≡ 0 (mod 5)
        out[first::5] = rng.standard_normal((len(out[first::5]), k, k))
        yield out


def synthetic_kernels(n: int, seed: int = 0, k: int = K) -> np.ndarray:
    """`synthetic_blocks` as one `[n, k, k]` array."""
    return np.concatenate(list(synthetic_blocks(n, seed, k)))


def write_npz(path: str, n: int, blocks, k: int) -> None:
    """`np.savez(path, kernels=…)` of `n` kernels `[n, k, k]` float32 given block by block:
    the blocks go to a raw file beside `path` first, which `np.savez` then copies from a
    read-only memory map, so this process never holds more than a block."""
    raw = f"{path}.raw"
    written = 0
    try:
        with open(raw, "wb") as f:
            for block in blocks:
                f.write(np.ascontiguousarray(block, np.float32).tobytes())
                written += len(block)
        if written != n:
            raise ValueError(f"{path}: {written} kernels given, {n} expected")
        np.savez(path, kernels=np.memmap(raw, np.float32, "r", shape=(n, k, k)))
    finally:
        if os.path.exists(raw):
            os.remove(raw)


def convert_set(tmp: str, name: str, n: int, env: dict, seed: int = 0, k: int = K,
                blocks=None) -> str:
    """`n` kernels (default `synthetic_blocks(n, seed, k)`) → `<tmp>/<name>.npz` →
    `python -m dwjax.convert --kernels_npz` → the data dir (the `.npz` is removed)."""
    npz = os.path.join(tmp, f"{name}.npz")
    write_npz(npz, n, synthetic_blocks(n, seed, k) if blocks is None else blocks, k)
    data = os.path.join(tmp, f"data_{name}")
    run_python(["-m", "dwjax.convert", f"--kernels_npz={npz}", f"--data_dir={data}"], env)
    os.remove(npz)
    return data


def run_python(args: list[str], env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"assign benchmark: {args[:2]} failed:\n{p.stderr[-3000:]}")
    return p


def train_decoder(tmp: str, env: dict, epochs: int, name: str = "run",
                  data: str | None = None) -> str:
    """A 7×7 run `<tmp>/<name>` trained `epochs` epochs on `data` (default: 20,000 synthetic
    kernels)."""
    data = data or convert_set(tmp, "train", 20_000, env, seed=1)
    workdir = os.path.join(tmp, name)
    run_python(["-m", "dwjax.train", "--kernel_size=7", f"--workdir={workdir}",
                f"--data_dir={data}", f"--config.num_epochs={epochs}",
                "--config.batch_size=256"], env)
    return workdir


# --------------------------------------------------------------------------------- the commands

def run_command(workdir: str, data: str, env: dict, args: tuple = (), fresh: bool = False,
                wrapper: str = WRAPPER) -> dict:
    """`python -m dwjax.assign` (through `wrapper`) on fresh assignments (`fresh`: a fresh
    workdir, for the k-means path, whose fit is part of the job): `{"wall", "rss_mib",
    "stdout", "run_s"}` (`run_s`: `dwjax.assign.run`'s seconds, from `host_ceiling.WRAPPER`)."""
    from dwjax.io import workdir as workdir_lib

    target = workdir if fresh else workdir_lib.RunDir(workdir).assignments
    shutil.rmtree(target, ignore_errors=True)
    t = time.perf_counter()
    p = run_python(["-c", wrapper, f"--workdir={workdir}", f"--data_dir={data}", *args], env)
    wall = time.perf_counter() - t
    tagged = dict(line.split(None, 1) for line in p.stderr.splitlines()
                  if line.startswith(("VMHWM_KIB ", "RUN_SECONDS ")))
    run_s = float(tagged["RUN_SECONDS"]) if "RUN_SECONDS" in tagged else None
    return {"wall": wall, "rss_mib": int(tagged["VMHWM_KIB"]) / 1024, "stdout": p.stdout,
            "run_s": run_s}


def rows_digest(workdir: str) -> str:
    """sha256 over every row of a job's assignments (part files in name order, each column's
    values, text by value), whatever the files' metadata: equal digests, equal rows."""
    import pyarrow.parquet as pq

    from dwjax.io import workdir as workdir_lib

    root = workdir_lib.RunDir(workdir).assignments
    files = sorted(rel for rel in (os.path.relpath(os.path.join(d, f), root)
                                   for d, _, fs in os.walk(root) for f in fs)
                   if rel.endswith(".parquet")
                   and not any(p.startswith(("_", ".")) for p in rel.split(os.sep)))
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode())
        table = pq.read_table(os.path.join(root, rel))
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            h.update(name.encode())
            if hasattr(col, "dictionary"):  # text: each index as its value's rank
                words = col.dictionary.to_pylist()
                canon = sorted(set(words))
                h.update("\0".join(canon).encode())
                rank = np.array([canon.index(w) for w in words] or [0], np.int64)
                values = rank[col.indices.to_numpy(zero_copy_only=False)]
            else:
                values = col.to_numpy(zero_copy_only=False)
            h.update(np.ascontiguousarray(values).tobytes())
            h.update(np.asarray(col.is_null()).tobytes())
    return h.hexdigest()


def bare_jax_start(env: dict, reps: int = 3) -> float:
    """Seconds of `python -c "import jax; jax.devices()"`: the floor of any jax command."""
    def start():
        run_python(["-c", "import jax; jax.devices()"], env)
    return best_of(start, reps)[0]


def best_of(fn, reps: int):
    """`(best seconds of reps calls, the last call's result)`."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
