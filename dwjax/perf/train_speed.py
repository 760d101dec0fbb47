"""Train benchmark: `python -m dwjax.train` (jitted, mesh-sharded steps, batches streamed from the
memmapped shards) vs the same network, loss, batch and optimizer as a plain PyTorch loop over data
already in memory (dwjax.perf.torch_autoencoder), on the same kernels, in one run
(`python -m dwjax.bench --parts=train`).

dwjax's steady rate is the median kernels/s of epochs 2.. (epoch 1 includes XLA compilation);
its end-to-end rate divides the kernels trained by the command's wall time (start-up, compile,
data scan, checkpoint and evaluation included).
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
from dwjax.perf import machine


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


def run(epochs: int = 10, batch_size: int = 256, kernel_size: int = 5, synthetic: int = 0,
        tmp: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The benchmark's entry. `synthetic`: N random kernels instead of the embedded default."""
    from dwjax.configs import train as train_configs

    cfg = train_configs.get_config(str(kernel_size))
    d = tempfile.mkdtemp(prefix="dwjax-bench-train-", dir=tmp)
    try:
        data_dir = _data(d, kernel_size, synthetic)
        kernels = np.concatenate([s.kernels for s in shards.iter_shards(data_dir, kernel_size)])
        workdir = os.path.join(d, "run")
        env = dict(os.environ, DWJAX_HOME=os.path.join(d, "home"))
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "dwjax.train", f"--kernel_size={kernel_size}",
             f"--workdir={workdir}", f"--data_dir={data_dir}", f"--config.num_epochs={epochs}",
             f"--config.batch_size={batch_size}", "--config.checkpoint_every_epochs=1000000"],
            capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError("train benchmark: python -m dwjax.train failed:\n"
                               + p.stderr[-3000:])
        with open(workdir_lib.RunDir(workdir).metrics_jsonl) as f:
            epoch_lines = [json.loads(line) for line in f if '"epoch"' in line]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    live = len(kernels) - int((~_valid(kernels)).sum())
    steps = (live // batch_size) * epochs
    steady = float(np.median([e["kernels_per_s"] for e in epoch_lines[1:]] or
                             [epoch_lines[0]["kernels_per_s"]]))
    e2e = steps * batch_size / wall
    figures = {"kernels": live, "kernel_size": kernel_size, "epochs": epochs,
               "batch_size": batch_size, "steps": steps, "steps_per_call": cfg.steps_per_call,
               "dwjax_steady_kernels_per_s": steady, "dwjax_command_s": wall,
               "dwjax_command_kernels_per_s": e2e, "dwjax_loss": epoch_lines[-1]["epoch_loss"]}
    log(f"train: dwjax {live:,} live {kernel_size}x{kernel_size} kernels, batch {batch_size}, "
        f"{epochs} epochs: steady {steady:,.0f} kernels/s, command {wall:.1f} s")
    seconds = {"dwjax_command": wall}
    if not machine.has_torch():
        rows = [machine.row("steady vs plain torch loop", steady, None, "kernels/s",
                                  None, "skipped (torch not installed)")]
        return {"benchmark": "train", "skipped": None, "rows": rows, "figures": figures,
                "seconds": seconds}
    import torch

    from dwjax.perf import torch_autoencoder

    torch.set_num_threads(os.cpu_count() or 1)
    coords = torch_autoencoder.embed_live(kernels)
    _, torch_loss, torch_s = torch_autoencoder.train(
        coords, epochs, batch_size, cfg.learning_rate, cfg.warmup_epochs,
        cfg.end_learning_rate_fraction)
    torch_rate = steps * batch_size / torch_s
    figures.update(torch_kernels_per_s=torch_rate, torch_s=torch_s, torch_loss=torch_loss,
                   torch_threads=torch.get_num_threads())
    seconds["torch_loop"] = torch_s
    log(f"train: plain torch loop {torch_rate:,.0f} kernels/s ({torch_s:.1f} s)")
    rows = [
        machine.row("steady vs plain torch loop", steady, torch_rate, "kernels/s",
                          steady / torch_rate, ">= 2x"),
        machine.row("command end to end vs torch loop", e2e, torch_rate, "kernels/s",
                          e2e / torch_rate),
    ]
    return {"benchmark": "train", "skipped": None, "rows": rows, "figures": figures,
            "seconds": seconds}


def _valid(kernels: np.ndarray) -> np.ndarray:
    from dwjax.model import preprocess

    return np.asarray(preprocess.valid_mask(kernels))
