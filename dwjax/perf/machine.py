"""What every benchmark reports beside its figures: the machine (CPUs, device kind and count,
versions, load average), this machine's fp32 GEMM peak, and a process's peak RSS.

Library code for `python -m dwjax.bench`; imports nothing heavy at module level, so benchmark
child processes can import it before their clocks start.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import resource
import subprocess
import sys

# OpenBLAS variables that can pin it to older kernels or caches than the CPU has.
UNPINNED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_GEMM = """
import sys, time
import numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
a @ b
best = 1e9
for _ in range(reps):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(2 * n ** 3 / best / 1e9)
"""


def has_torch() -> bool:
    return (importlib.util.find_spec("torch") is not None
            and importlib.util.find_spec("timm") is not None)


def gemm_peak_gflops(n: int = 4096, reps: int = 3) -> float:
    """numpy's `n³` fp32 GEMM, best of `reps`, in a subprocess with `UNPINNED` unset."""
    env = {k: v for k, v in os.environ.items() if k not in UNPINNED}
    out = subprocess.run([sys.executable, "-c", _GEMM, str(n), str(reps)], capture_output=True,
                         text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak RSS: /proc VmHWM (per address space, fresh at exec), else
    ru_maxrss (which on Linux carries a parent's high-water mark across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict:
    """The machine, as the benchmark JSON records it."""
    import jax
    import numpy as np

    devices = jax.devices()
    torch_version = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch_version = torch.__version__
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device_count": len(devices),
            "python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
            "torch": torch_version,
            "blas_env": {k: os.environ.get(k) for k in UNPINNED if k in os.environ},
            "load_average": load_average()}


def row(what: str, ours: float | None, reference: float | None, unit: str, ratio: float | None,
        target: str = "", percent: bool = False) -> dict:
    """One line of the table: `ratio` is how many times better ours is (or a fraction, where the
    reference is a ceiling such as the GEMM peak: `percent`, or a target with %); None where a
    side was not measured."""
    return {"what": what, "ours": ours, "reference": reference, "unit": unit, "ratio": ratio,
            "target": target, "percent": percent or "%" in target}


def skipped(name: str, reason: str) -> dict:
    return {"benchmark": name, "skipped": reason, "rows": [], "figures": {}}
