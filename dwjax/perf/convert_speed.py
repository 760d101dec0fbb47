"""Convert benchmark: the depthwise kernels of a large checkpoint, dwjax's lazy reader vs building
the timm model and loading the weights (`python -m dwjax.bench --parts=convert`).

A random-init timm model (no network) is saved as .safetensors in a temp dir, then each method
runs in a fresh subprocess, so that its peak RSS (VmHWM) is its own:

  lazy      `layers_from_state(open_checkpoint(path))` (torch is never imported)
  source    `checkpoint_source(path).load()`: the `convert` path (adds the file's sha256)
  timm      `timm.create_model` + `load_state_dict(safetensors load_file)` + `layers_from_module`

Time runs in the child from before its imports to the end; ratios use the last of `repeats`
back-to-back runs (warm page cache). The methods' kernels must agree (sha256 over names, shapes,
bytes).
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

from dwjax.perf import machine

METHODS = ("lazy", "source", "timm")
_CHILD = ("import json, sys\nfrom dwjax.perf import convert_speed\n"
          "print(json.dumps(convert_speed.child(*sys.argv[1:])))\n")


def _digest(layers) -> tuple[str, int]:
    import hashlib

    h = hashlib.sha256()
    for layer in layers:
        h.update(f"{layer.name}|{layer.kernels.dtype}|{layer.kernels.shape}|".encode())
        h.update(layer.kernels.tobytes())
    return h.hexdigest(), sum(len(layer.kernels) for layer in layers)


def child(method: str, path: str, model: str) -> dict:
    """One method, in this (fresh) process."""
    t0 = time.perf_counter()
    out: dict = {}
    if method == "make":
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        m = timm.create_model(model, pretrained=False)
        out["params"] = sum(p.numel() for p in m.parameters())
        save_file(m.state_dict(), path)
        layers = None
    elif method == "lazy":
        from dwjax.io.extract import layers_from_state
        from dwjax.io.weight_files import open_checkpoint

        layers = layers_from_state(open_checkpoint(path))
    elif method == "source":
        from dwjax.io.sources import checkpoint_source

        layers = checkpoint_source(path).load()
    elif method == "timm":
        import timm
        from safetensors.torch import load_file

        from dwjax.io.extract import layers_from_module

        m = timm.create_model(model, pretrained=False)
        m.load_state_dict(load_file(path))
        layers = layers_from_module(m)
    else:
        raise ValueError(f"unknown method {method}")
    if layers is not None:
        out["digest"], out["kernels"] = _digest(layers)
        out["layers"] = len(layers)
    out["s"] = time.perf_counter() - t0
    out["rss_mib"] = machine.peak_rss_mib()
    out["torch_imported"] = "torch" in sys.modules
    return out


def _spawn(method: str, path: str, model: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, method, path, model], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert benchmark: {method} failed (rc {r.returncode}):\n"
                           f"{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def run(model: str = "convnextv2_huge", repeats: int = 2, tmp: str | None = None,
        log: Callable[[str], None] = print) -> dict:
    """The benchmark's entry: figures per method and the ratios (lazy and source vs timm)."""
    if not machine.has_torch():
        return machine.skipped("convert", "skipped (torch not installed)")
    d = tempfile.mkdtemp(prefix="dwjax-bench-convert-", dir=tmp)
    try:
        path = os.path.join(d, f"{model}.safetensors")
        made = _spawn("make", path, model)
        size = os.path.getsize(path)
        log(f"convert: {model} random init, {made['params'] / 1e6:.1f}M params, "
            f"{size / 1e9:.2f} GB .safetensors; {len(METHODS)} methods x {repeats}")
        runs = {m: [_spawn(m, path, model) for _ in range(repeats)] for m in METHODS}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    last = {m: runs[m][-1] for m in METHODS}
    digests = {r["digest"] for m in METHODS for r in runs[m]}
    if len(digests) != 1:
        raise RuntimeError("convert benchmark: the methods disagree on the kernels")
    lz, src, tm = last["lazy"], last["source"], last["timm"]
    rows = [
        machine.row("lazy reader vs timm build", lz["s"], tm["s"], "s",
                          tm["s"] / lz["s"], ">= 10x"),
        machine.row("lazy reader vs timm build, peak RSS", lz["rss_mib"], tm["rss_mib"],
                          "MiB", tm["rss_mib"] / lz["rss_mib"], ">= 20x"),
        machine.row("convert path (+sha256) vs timm build", src["s"], tm["s"], "s",
                          tm["s"] / src["s"]),
    ]
    figures = {"model": model, "params": made["params"], "file_bytes": size,
               "kernels": lz["kernels"], "layers": lz["layers"], "repeats": repeats,
               "torch_imported_by_lazy": lz["torch_imported"],
               "runs": {m: [{k: v for k, v in r.items() if k != "digest"} for r in runs[m]]
                        for m in METHODS}}
    return {"benchmark": "convert", "skipped": None, "rows": rows, "figures": figures,
            "seconds": {m: last[m]["s"] for m in METHODS}}
