"""Train benchmark: `python -m dwjax.train` (jitted, mesh-sharded steps, batches streamed from the
memmapped shards) against the same network, loss, batch, optimizer and step count in PyTorch at its
best on this machine (dwjax.perf.torch_autoencoder.VARIANTS: eager with the default and with fused
Adam, `torch.compile`; threads = cores, the data's coordinates loaded whole), and against the
fp32 GEMM peak, in one run (`python -m dwjax.bench --parts=train`). Each side runs `repeats`
times; the table has the medians, the notes the spread.

Steady rates are the median kernels/s of epochs 2.. (epoch 1 includes compilation on either side).
End to end, each side is a program run in its own process and timed from outside: dwjax's is
`python -m dwjax.train` (interpreter start, imports, compile, data scan, checkpoint and evaluation
included), torch's is `torch_autoencoder.PROGRAM` (interpreter start, `import torch`, the
coordinates loaded from a `.npy`, the loop with its compilation, the weights saved). The notes
also give torch's loop alone, timed inside its process.
The GEMM-peak row counts `train_flops_per_kernel` per kernel and step: the Dense layers' fp32
multiply-adds, forward and backward.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from dwjax.io import shards, sources
from dwjax.io import workdir as workdir_lib
from dwjax.perf import machine, torch_autoencoder  # no torch or jax at import


def train_flops_per_kernel(kernel_size: int, hidden=(256, 128, 64, 32)) -> int:
    """fp32 flops one kernel costs per optimizer step: 2 per multiply-add of every Dense layer
    (encoder and its mirror, the decoder), forward once and backward twice (input and weight
    gradients); activations, loss and Adam are left out."""
    widths = [kernel_size * kernel_size - 1, *hidden, 1]
    macs = 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3 * 2 * macs


def _data(d: str, kernel_size: int, synthetic: int) -> str:
    data_dir = os.path.join(d, "data")
    if synthetic:
        path = os.path.join(d, "synthetic.npz")
        rng = np.random.default_rng(0)
        np.savez(path, kernels=rng.normal(size=(synthetic, kernel_size, kernel_size))
                 .astype(np.float32))
        srcs = [sources.npz_source(path)]
    else:
        srcs = sources.embedded_sources()
    shards.add_sources(data_dir, srcs, log=lambda *_: None)
    return data_dir


def _dwjax_run(d: str, data_dir: str, kernel_size: int, epochs: int, batch_size: int,
               i: int) -> dict:
    """One `python -m dwjax.train` command in a fresh run directory: wall time and epoch lines."""
    workdir = os.path.join(d, f"run{i}")
    env = dict(os.environ, DWJAX_HOME=os.path.join(d, "home"))
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "dwjax.train", f"--kernel_size={kernel_size}",
         f"--workdir={workdir}", f"--data_dir={data_dir}", f"--config.num_epochs={epochs}",
         f"--config.batch_size={batch_size}", "--config.checkpoint_every_epochs=1000000"],
        capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError("train benchmark: python -m dwjax.train failed:\n" + p.stderr[-3000:])
    with open(workdir_lib.RunDir(workdir).metrics_jsonl) as f:
        lines = [json.loads(line) for line in f if '"epoch"' in line]
    rates = [e["kernels_per_s"] for e in lines]
    return {"wall_s": wall, "steady": float(np.median(rates[1:] or rates)),
            "loss": lines[-1]["epoch_loss"]}


def _torch_program(d: str, variant: str, epochs: int, batch_size: int, cfg, trained: int) -> dict:
    """One PyTorch program run (torch_autoencoder.PROGRAM) in its own process, timed from outside:
    steady kernels/s (median epoch after the first), its loop's kernels/s (what the loop alone
    measures, compilation included) and the program's end to end (interpreter start, `import
    torch`, data, loop, weights saved)."""
    args = [os.path.join(d, "coords"), os.path.join(d, f"{variant}.pt"), str(epochs),
            str(batch_size), str(cfg.learning_rate), str(cfg.warmup_epochs),
            str(cfg.end_learning_rate_fraction), variant]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", torch_autoencoder.PROGRAM, *args],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"train benchmark: the {variant} PyTorch program failed:\n"
                           + p.stderr[-3000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    per_epoch = trained / epochs
    return {"steady": per_epoch / float(np.median(r["epoch_seconds"][1:] or r["epoch_seconds"])),
            "loop": trained / r["seconds"], "e2e": trained / wall, "seconds": wall,
            "loop_seconds": r["seconds"], "loss": r["loss"]}


def _spread(values: list[float]) -> str:
    return (f"{np.median(values):,.0f} (runs {min(values):,.0f} to {max(values):,.0f})"
            if len(values) > 1 else f"{values[0]:,.0f} (one run)")


def run(epochs: int = 10, batch_size: int = 256, kernel_size: int = 5, synthetic: int = 0,
        repeats: int = 2, variants: tuple[str, ...] | None = None, tmp: str | None = None,
        log: Callable[[str], None] = print) -> dict:
    """The benchmark's entry. `synthetic`: N random kernels instead of the embedded default;
    `variants`: some of torch_autoencoder.VARIANTS (default all)."""
    from dwjax.configs import train as train_configs

    cfg = train_configs.get_config(str(kernel_size))
    d = tempfile.mkdtemp(prefix="dwjax-bench-train-", dir=tmp)
    try:
        data_dir = _data(d, kernel_size, synthetic)
        kernels = np.concatenate([s.kernels for s in shards.iter_shards(data_dir, kernel_size)])
        ours = [_dwjax_run(d, data_dir, kernel_size, epochs, batch_size, i)
                for i in range(repeats)]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    live = len(kernels) - int((~_valid(kernels)).sum())
    trained = (live // batch_size) * epochs * batch_size
    steady = float(np.median([r["steady"] for r in ours]))
    e2e_runs = [trained / r["wall_s"] for r in ours]
    e2e = float(np.median(e2e_runs))
    flops = train_flops_per_kernel(kernel_size, tuple(cfg.model.hidden))
    peak = machine.gemm_peak_gflops()
    figures = {"kernels": live, "kernel_size": kernel_size, "epochs": epochs,
               "batch_size": batch_size, "repeats": repeats, "steps_per_call": cfg.steps_per_call,
               "flops_per_kernel_step": flops, "gemm_peak_gflops": peak,
               "dwjax_steady_kernels_per_s": steady, "dwjax_runs": ours,
               "dwjax_command_kernels_per_s": e2e, "dwjax_loss": ours[-1]["loss"]}
    log(f"train: dwjax {live:,} live {kernel_size}x{kernel_size} kernels, batch {batch_size}, "
        f"{epochs} epochs: steady {_spread([r['steady'] for r in ours])} kernels/s, "
        f"command {_spread(e2e_runs)} kernels/s")
    notes = [f"a step costs {flops:,} fp32 flops per kernel (Dense layers, forward + backward); "
             f"dwjax steady kernels/s {_spread([r['steady'] for r in ours])}, command end to end "
             f"{_spread(e2e_runs)}"]
    rows = [machine.row("steady vs fp32 GEMM peak", steady * flops / 1e9, peak, "GFLOP/s",
                        steady * flops / 1e9 / peak, ">= 50%")]
    seconds = {f"dwjax_command_{i}": r["wall_s"] for i, r in enumerate(ours)}
    if not machine.has_torch():
        rows.append(machine.row("steady vs fastest torch", steady, None, "kernels/s", None,
                                "skipped (torch not installed)"))
        return {"benchmark": "train", "skipped": None, "rows": rows, "figures": figures,
                "seconds": seconds, "notes": notes}
    coords = torch_autoencoder.embed_live(kernels)  # before the clock: a few ms, not the loop
    theirs = {}
    variants = tuple(variants or torch_autoencoder.VARIANTS)
    d = tempfile.mkdtemp(prefix="dwjax-bench-torch-", dir=tmp)
    try:
        with open(os.path.join(d, "coords"), "wb") as f:  # numpy's format; the program loads it
            np.save(f, coords)
        for variant in variants:
            runs = [_torch_program(d, variant, epochs, batch_size, cfg, trained)
                    for _ in range(repeats)]
            theirs[variant] = runs
            name = torch_autoencoder.VARIANT_NAMES[variant]
            log(f"train: {name}: steady {_spread([r['steady'] for r in runs])} kernels/s, "
                f"program {_spread([r['e2e'] for r in runs])} kernels/s")
            notes.append(f"{name}: steady kernels/s {_spread([r['steady'] for r in runs])}, "
                         f"its loop alone {_spread([r['loop'] for r in runs])}, the program end "
                         f"to end {_spread([r['e2e'] for r in runs])}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    notes.append("command rows: each side's whole program in its own process, timed from outside "
                 "(torch: interpreter start, import torch, data, loop, weights saved)")
    med = {v: {k: float(np.median([r[k] for r in runs])) for k in ("steady", "e2e")}
           for v, runs in theirs.items()}
    figures.update(torch_threads=os.cpu_count() or 1, torch_runs=theirs, torch_medians=med)
    fastest_steady = max(med, key=lambda v: med[v]["steady"])
    fastest_e2e = max(med, key=lambda v: med[v]["e2e"])
    for v in variants:
        rows.append(machine.row(f"steady vs {torch_autoencoder.VARIANT_NAMES[v]}", steady,
                                med[v]["steady"], "kernels/s", steady / med[v]["steady"],
                                ">= 2x" if v == fastest_steady else ""))
    for v in variants:
        rows.append(machine.row(f"command vs {torch_autoencoder.VARIANT_NAMES[v]}", e2e,
                                med[v]["e2e"], "kernels/s", e2e / med[v]["e2e"],
                                ">= 1.5x" if v == fastest_e2e else ""))
    return {"benchmark": "train", "skipped": None, "rows": rows, "figures": figures,
            "seconds": seconds, "notes": notes}


def _valid(kernels: np.ndarray) -> np.ndarray:
    from dwjax.model import preprocess

    return np.asarray(preprocess.valid_mask(kernels))
