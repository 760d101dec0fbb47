"""The same autoencoder and loss as a PyTorch program: the yardstick for the faithfulness test and
the training benchmark (dwjax.perf.train_speed; no stage trains with it; torch comes with the
`convert` extra).

`VARIANTS` are the ways a PyTorch user would tune this loop on a CPU: eager with the default Adam
(foreach), eager with fused Adam, and `torch.compile` of the forward+loss and of the optimizer step
(the learning rate a tensor, so the schedule does not recompile). All three do the same updates.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import numpy as np

VARIANTS = ("eager", "eager_fused_adam", "compiled")
VARIANT_NAMES = {"eager": "torch eager", "eager_fused_adam": "torch eager fused Adam",
                 "compiled": "torch.compile"}


@dataclasses.dataclass
class TorchRun:
    model: object            # the trained torch.nn.Sequential
    mean_loss: float         # mean dissimilarity over every kernel given, after training
    seconds: float           # the whole loop, compilation included
    epoch_seconds: list      # each epoch's wall time (the first includes compilation)
    losses: list             # each step's batch loss, in order


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


def load_params(model, params: dict) -> None:
    """Copies dwjax's pure-dict parameters into `build`'s model, in place: its Linear layers are
    encoder 0…, to_code, from_code, decoder 0…; a torch weight `[out, in]` is a kernel `[in, out]`
    transposed."""
    import torch

    blocks = [*(params["encoder"][i] for i in sorted(params["encoder"])), params["to_code"],
              params["from_code"], *(params["decoder"][i] for i in sorted(params["decoder"]))]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    if len(linears) != len(blocks):
        raise ValueError(f"params have {len(blocks)} layers, the model {len(linears)}")
    with torch.no_grad():
        for layer, block in zip(linears, blocks):
            layer.weight.copy_(torch.from_numpy(np.array(block["kernel"], np.float32).T))
            layer.bias.copy_(torch.from_numpy(np.array(block["bias"], np.float32)))


def _loss(x, recon):
    import torch

    return (1 - torch.nn.functional.cosine_similarity(x, recon, dim=1, eps=1e-12)).mean()


def train(coords: np.ndarray, num_epochs: int, batch_size: int, learning_rate: float,
          warmup_epochs: float = 1.0, end_fraction: float = 0.02, seed: int = 0,
          hidden=(256, 128, 64, 32), negative_slope: float = 0.01,
          max_steps: int | None = None, variant: str = "eager",
          init: dict | None = None,
          epoch_order: Callable[[int], np.ndarray] | None = None) -> TorchRun:
    """Adam with linear warm-up + cosine decay, as configs/train.py.

    Args:
      coords: `[N, k*k-1]` unit hyperplane coordinates (preprocess.embed of the live kernels).
      variant: one of `VARIANTS`.
      init: starting weights as dwjax's pure-dict parameters (`decoder.param_template`'s layout);
        None keeps torch's own initialisation.
      epoch_order: epoch → `[N]` permutation of `coords` it visits batch by batch (e.g.
        dwjax.model.dataset.epoch_order, the batches a dwjax run sees); None draws its own.
    """
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    torch.manual_seed(seed)
    x_all = torch.from_numpy(np.array(coords, np.float32))  # a writable copy
    model = build(x_all.shape[1], hidden, negative_slope)
    if init is not None:
        load_params(model, init)
    compiled = variant == "compiled"
    # A tensor learning rate lets the compiled step take each new value without recompiling.
    opt = torch.optim.Adam(model.parameters(),
                           lr=torch.tensor(learning_rate) if compiled else learning_rate,
                           fused=variant == "eager_fused_adam")
    steps_per_epoch = len(x_all) // batch_size
    total, warmup = num_epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)

    def lr_at(step):
        if step < warmup:
            return learning_rate * step / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * t))
        return learning_rate * (end_fraction + (1 - end_fraction) * cosine)

    def forward_loss(x):
        return _loss(x, model(x))

    def opt_step():
        opt.step()

    if compiled:
        forward_loss, opt_step = torch.compile(forward_loss), torch.compile(opt_step)
    gen = np.random.default_rng(seed)
    step, epoch_seconds, losses, t0 = 0, [], [], time.perf_counter()
    for epoch in range(num_epochs):
        te = time.perf_counter()
        perm = gen.permutation(len(x_all)) if epoch_order is None else epoch_order(epoch)
        order = torch.from_numpy(np.asarray(perm, np.int64))
        for b in range(steps_per_epoch):
            for g in opt.param_groups:
                if compiled:
                    g["lr"].fill_(lr_at(step))
                else:
                    g["lr"] = lr_at(step)
            loss = forward_loss(x_all[order[b * batch_size:(b + 1) * batch_size]])
            opt.zero_grad()
            loss.backward()
            opt_step()
            losses.append(loss.detach())  # no host sync per step: read once at the end
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        epoch_seconds.append(time.perf_counter() - te)
        if max_steps is not None and step >= max_steps:
            break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        mean = float(_loss(x_all, model(x_all)))
    return TorchRun(model, mean, seconds, epoch_seconds, [float(v) for v in losses])


def embed_live(kernels: np.ndarray) -> np.ndarray:
    """Live kernels `[N, k, k]` → `[N_live, k*k-1]` coordinates, with the shared preprocessing."""
    from dwjax.model import preprocess  # here: the program below imports this module without jax

    live = kernels[preprocess.valid_mask(kernels)]
    return np.asarray(preprocess.embed(live))


# The PyTorch program as a user runs it, end to end in its own process: Python's start, `import
# torch`, the data (coordinates saved by the caller: `[N, k*k-1]` float32 `.npy`), the loop, the
# trained weights saved. The benchmark times the process from outside; it prints the loop's own
# figures as one JSON line. This module imports no jax, so the process does not either.
PROGRAM = """
import sys
from dwjax.perf import torch_autoencoder
torch_autoencoder.program_main(sys.argv[1:])
"""


def program_main(argv: list[str]) -> None:
    """`COORDS.npy OUT.pt EPOCHS BATCH LR WARMUP END_FRACTION VARIANT`: trains with every core
    and saves the state dict; prints `{"seconds", "epoch_seconds", "loss"}`."""
    import torch

    coords, out, epochs, batch, lr, warmup, end, variant = argv
    torch.set_num_threads(os.cpu_count() or 1)
    run = train(np.load(coords), int(epochs), int(batch), float(lr), float(warmup), float(end),
                variant=variant)
    torch.save(run.model.state_dict(), out)
    print(json.dumps({"seconds": run.seconds, "epoch_seconds": run.epoch_seconds,
                      "loss": run.mean_loss}))
    sys.stdout.flush()
