"""Benchmark: depthwise kernels of a multi-GB checkpoint, dwjax's lazy reader vs building the model.

    python launch/bench_convert.py [--model=convnextv2_huge] [--repeats=2] [--tmp=/tmp]

Makes a random-init timm model (no network), saves it as .safetensors in a temp dir (deleted at the
end), then runs each method in a fresh subprocess so that its peak RSS is its own:

  lazy      dwjax: layers_from_state(open_checkpoint(path)) (no torch imported)
  sha256    dwjax: sha256 of the file alone (what checkpoint_source adds, for the source id)
  source    dwjax: checkpoint_source(path).load() (open + sha256 + lazy read: the `convert` path)
  timm      timm.create_model(pretrained=False) + load_state_dict(safetensors.torch.load_file(path))
            + layers_from_module(model)

Time is measured in the child from before its imports to the end of the conversion ("s"), and by the
parent from spawn to exit ("wall s", adds interpreter start-up). Peak RSS is the child's VmHWM (high
water mark of its own address space, file-backed mmap pages included; ru_maxrss is printed too but
on Linux it can carry the parent's RSS across exec). Each method runs `--repeats` times back to back;
the ratios use the last (warm page cache) run. The kernels of `lazy`, `source` and `timm` must agree
(sha256 over names, shapes and bytes, in order).
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

METHODS = ("lazy", "sha256", "source", "timm")


# ----------------------------------------------------------------------------- child side
def _peak_rss_mib() -> tuple[float, float]:
    import resource

    hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _digest(layers) -> tuple[str, int]:
    import hashlib

    h = hashlib.sha256()
    for l in layers:
        h.update(f"{l.name}|{l.kernels.dtype}|{l.kernels.shape}|".encode())
        h.update(l.kernels.tobytes())
    return h.hexdigest(), sum(len(l.kernels) for l in layers)


def child(method: str, path: str, model: str) -> dict:
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
    elif method == "lazy":
        from dwjax.weight_files import open_checkpoint
        from dwjax.extract import layers_from_state

        layers = layers_from_state(open_checkpoint(path))
        out["digest"], out["kernels"] = _digest(layers)
        out["layers"] = len(layers)
    elif method == "sha256":
        from dwjax.shards import sha256_file

        out["sha256"] = sha256_file(path)
    elif method == "source":
        from dwjax.sources import checkpoint_source

        layers = checkpoint_source(path).load()
        out["digest"], out["kernels"] = _digest(layers)
        out["layers"] = len(layers)
    elif method == "timm":
        import timm
        from safetensors.torch import load_file

        from dwjax.extract import layers_from_module

        m = timm.create_model(model, pretrained=False)
        m.load_state_dict(load_file(path))
        layers = layers_from_module(m)
        out["digest"], out["kernels"] = _digest(layers)
        out["layers"] = len(layers)
    else:
        raise SystemExit(f"unknown method {method}")
    out["s"] = time.perf_counter() - t0
    out["rss_mib"], out["ru_maxrss_mib"] = _peak_rss_mib()
    out["torch_imported"] = "torch" in sys.modules
    return out


# ----------------------------------------------------------------------------- parent side
def spawn(method: str, path: str, model: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={method}", f"--path={path}",
                        f"--model={model}"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench: {method} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="convnextv2_huge")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--child")
    ap.add_argument("--path")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.path, a.model)))
        return

    tmp = tempfile.mkdtemp(prefix="dwjax-bench-", dir=a.tmp)
    try:
        path = os.path.join(tmp, f"{a.model}.safetensors")
        made = spawn("make", path, a.model)
        size = os.path.getsize(path)
        print(f"{a.model}: {made['params'] / 1e6:.1f}M params, random init (seed 0), {path} "
              f"{size / 1e9:.2f} GB (written in {made['wall_s']:.1f}s, peak RSS {made['rss_mib'] / 1024:.2f} GiB)")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; each method {a.repeats}x in fresh "
              f"subprocesses, back to back; figures below are the last (warm page cache) run")
        runs = {m: [spawn(m, path, a.model) for _ in range(a.repeats)] for m in METHODS}
        print(f"\n{'method':<8}{'run':>4}{'s':>9}{'wall s':>9}{'peak RSS MiB':>14}{'ru_maxrss MiB':>15}"
              f"{'torch?':>8}  result")
        for m in METHODS:
            for i, r in enumerate(runs[m], 1):
                what = (f"sha256 {r['sha256'][:16]}" if m == "sha256" else
                        f"{r['kernels']:,} kernels / {r['layers']} layers, digest {r['digest'][:16]}")
                print(f"{m:<8}{i:>4}{r['s']:>9.2f}{r['wall_s']:>9.2f}{r['rss_mib']:>14.1f}"
                      f"{r['ru_maxrss_mib']:>15.1f}{'yes' if r['torch_imported'] else 'no':>8}  {what}")
        last = {m: runs[m][-1] for m in METHODS}
        digests = {r["digest"] for m in ("lazy", "source", "timm") for r in runs[m]}
        same = len(digests) == 1
        print(f"\nkernels identical (lazy, source, timm; every run): {'YES' if same else 'NO'}")
        lz, tm, src = last["lazy"], last["timm"], last["source"]
        print(f"lazy reader vs timm model: {tm['s'] / lz['s']:.1f}x faster ({lz['s']:.2f}s vs {tm['s']:.2f}s; "
              f"spawn-to-exit {tm['wall_s'] / lz['wall_s']:.1f}x), {tm['rss_mib'] / lz['rss_mib']:.1f}x less "
              f"peak memory ({lz['rss_mib']:.0f} MiB vs {tm['rss_mib']:.0f} MiB)  [target >=10x, >=20x]")
        print(f"checkpoint_source().load() (with sha256) vs timm model: {tm['s'] / src['s']:.1f}x faster "
              f"({src['s']:.2f}s, of which sha256 alone {last['sha256']['s']:.2f}s = "
              f"{size / 1e9 / last['sha256']['s']:.2f} GB/s), {tm['rss_mib'] / src['rss_mib']:.1f}x less peak memory")
        if not same:
            raise SystemExit("bench: the methods disagree on the kernels")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
