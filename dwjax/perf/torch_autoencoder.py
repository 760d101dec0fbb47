"""The same autoencoder and loss as a plain PyTorch loop: the yardstick for the faithfulness test
and the training benchmark (dwjax.perf.train_speed; no stage trains with it; torch comes with the
`convert` extra)."""
from __future__ import annotations

import math
import time

import numpy as np

from dwjax.model import preprocess


def build(dim: int, hidden=(256, 128, 64, 32), negative_slope: float = 0.01):
    import torch.nn as nn

    widths = [dim, *hidden]
    enc, dec = [], []
    for a, b in zip(widths[:-1], widths[1:]):
        enc += [nn.Linear(a, b), nn.LeakyReLU(negative_slope)]
    enc += [nn.Linear(widths[-1], 1), nn.Sigmoid()]
    rev = widths[::-1]
    dec += [nn.Linear(1, rev[0]), nn.LeakyReLU(negative_slope)]
    for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
        last = i == len(rev) - 2
        dec += [nn.Linear(a, b), nn.Tanh() if last else nn.LeakyReLU(negative_slope)]
    return nn.Sequential(*enc, *dec)


def _loss(x, recon):
    import torch

    return (1 - torch.nn.functional.cosine_similarity(x, recon, dim=1, eps=1e-12)).mean()


def train(coords: np.ndarray, num_epochs: int, batch_size: int, learning_rate: float,
          warmup_epochs: float = 1.0, end_fraction: float = 0.02, seed: int = 0,
          hidden=(256, 128, 64, 32), negative_slope: float = 0.01,
          max_steps: int | None = None):
    """Adam with linear warm-up + cosine decay, as configs/train.py. Returns (model, mean loss,
    seconds).

    Args:
      coords: `[N, k*k-1]` unit hyperplane coordinates (preprocess.embed of the live kernels).
    """
    import torch

    torch.manual_seed(seed)
    x_all = torch.from_numpy(np.array(coords, np.float32))  # a writable copy
    model = build(x_all.shape[1], hidden, negative_slope)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps_per_epoch = len(x_all) // batch_size
    total, warmup = num_epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)

    def lr_at(step):
        if step < warmup:
            return learning_rate * step / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * t))
        return learning_rate * (end_fraction + (1 - end_fraction) * cosine)

    gen = np.random.default_rng(seed)
    step, t0 = 0, time.perf_counter()
    for _ in range(num_epochs):
        order = torch.from_numpy(gen.permutation(len(x_all)))
        for b in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x = x_all[order[b * batch_size:(b + 1) * batch_size]]
            loss = _loss(x, model(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        mean = float(_loss(x_all, model(x_all)))
    return model, mean, seconds


def embed_live(kernels: np.ndarray) -> np.ndarray:
    """Live kernels `[N, k, k]` → `[N_live, k*k-1]` coordinates, with the shared preprocessing."""
    live = kernels[preprocess.valid_mask(kernels)]
    return np.asarray(preprocess.embed(live))
