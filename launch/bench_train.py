"""Benchmark (not a test): training throughput of the jitted, mesh-sharded step vs a plain PyTorch loop.

Same network (configs/train.py widths), same batch, same optimizer (Adam, warm-up + cosine), same data
(the embedded default's live 5×5 kernels, or random unit kernels with --synthetic), on the same
machine, in one run. Prints kernels/s of both and the ratio (target ≥ 2×).

    python launch/bench_train.py [--kernel_size=5] [--epochs=5] [--batch_size=256] [--threads=N]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel_size", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--synthetic", type=int, default=0, help="N random kernels instead of the embedded default")
    args = ap.parse_args()

    import jax
    import torch

    from dwjax.configs import train as train_configs
    from dwjax import convert, sources, train
    from tests import torch_reference
    from dwjax.shards import iter_shards

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="dwjax-bench-")
    data_dir = os.path.join(tmp, "data")
    k = args.kernel_size
    if args.synthetic:
        path = os.path.join(tmp, "synthetic.npz")
        np.savez(path, kernels=np.random.default_rng(0).normal(size=(args.synthetic, k, k)).astype(np.float32))
        convert.convert(data_dir, [sources.npz_source(path)], log=lambda *_: None)
    else:
        convert.convert(data_dir, sources.embedded_sources(), log=lambda *_: None)
    kernels = np.concatenate([s.kernels for s in iter_shards(data_dir, k)])
    coords = torch_reference.embed_live(kernels)

    cfg = train_configs.get_config(str(k))
    cfg.num_epochs, cfg.batch_size, cfg.checkpoint_every_epochs = args.epochs, args.batch_size, 10**6
    workdir = os.path.join(tmp, "run")
    t0 = time.perf_counter()
    res = train.train_and_evaluate(cfg, workdir, data_dir, log=lambda *_: None)
    jax_total = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        epochs = [json.loads(l) for l in f if '"epoch"' in l]
    # Epoch 1 includes XLA compilation; the steady rate is the median of the others.
    jax_rate = float(np.median([e["kernels_per_s"] for e in epochs[1:]]))
    steps = (len(coords) // args.batch_size) * args.epochs

    _, torch_loss, torch_s = torch_reference.train(coords, args.epochs, args.batch_size, cfg.learning_rate,
                                                   cfg.warmup_epochs, cfg.end_learning_rate_fraction)
    torch_rate = steps * args.batch_size / torch_s
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__}), "
          f"torch {torch.__version__} on {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"data: {len(coords):,} live {k}x{k} kernels, batch {args.batch_size}, {args.epochs} epochs = {steps} steps, "
          f"{cfg.steps_per_call} steps per jitted call")
    print(f"dwjax  steady (median epoch 2..{args.epochs}, memmap streaming incl.): {jax_rate:>10,.0f} kernels/s")
    print(f"dwjax  end to end (compile, data scan, checkpoint, eval incl.):     "
          f"{steps * args.batch_size / jax_total:>10,.0f} kernels/s ({jax_total:.2f} s, loss {res.eval_loss:.4f})")
    print(f"torch  plain loop (data already in memory):                        {torch_rate:>10,.0f} kernels/s "
          f"({torch_s:.2f} s, loss {torch_loss:.4f})")
    print(f"ratio dwjax/torch: steady {jax_rate / torch_rate:.2f}x, end to end "
          f"{steps * args.batch_size / jax_total / torch_rate:.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
