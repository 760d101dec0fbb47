"""The autoencoder's decoder as a function of its parameters, without flax.

One forward pass (`decode_layers`) serves the nnx model in training
(`autoencoder.Autoencoder.decode`, jax, float32 at preprocess.PRECISION) and inference from saved
parameters (`decode_codes`: spectrum, labels, assign) in numpy float64, rounded once to float32: no
compile, no flax import (most of a short `assign`'s start-up and exit), and the same
reconstructions whatever accelerator a job runs on. Saved parameters are pure dicts laid out as
`nnx.to_pure_dict` lays out the model (`param_template`; `model.npz` and the orbax `params` item
hold them).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dwjax.model import preprocess


def dense(x, kernel, bias, xp=jnp):
    """`[N, a] @ [a, b] + [b]`; in jax at float32 precision (what `nnx.Linear(precision=HIGHEST)`
    does), in numpy at the arrays' own."""
    if xp is np:
        return x @ kernel + bias
    return jnp.dot(x, kernel, precision=preprocess.PRECISION) + bias


def decode_layers(layers: Sequence[tuple], codes, negative_slope: float, xp=jnp):
    """codes `[M]` → reconstructions `[M, k*k-1]` in [−1, 1] (not unit length).

    `layers`: `(kernel [a, b], bias [b])` from the code (a = 1) to the output, LeakyReLU between
    them and tanh after the last; `xp` is jax.numpy or numpy.
    """
    x = codes[:, None]
    for kernel, bias in layers[:-1]:
        h = dense(x, kernel, bias, xp)
        x = xp.where(h >= 0, h, negative_slope * h)  # leaky ReLU, as jax.nn.leaky_relu
    kernel, bias = layers[-1]
    return xp.tanh(dense(x, kernel, bias, xp))


def param_template(kernel_size: int, hidden: Sequence[int]) -> dict:
    """The model's pure-dict parameters as `jax.ShapeDtypeStruct` leaves (a restore target):
    `{"encoder": {i: {"kernel", "bias"}}, "to_code", "from_code", "decoder": {i: …}}`, the layout
    of `nnx.to_pure_dict` for `autoencoder.Autoencoder` (tested equal)."""
    widths = [kernel_size * kernel_size - 1, *[int(h) for h in hidden]]

    def linear(a: int, b: int) -> dict:
        return {"kernel": jax.ShapeDtypeStruct((a, b), jnp.float32),
                "bias": jax.ShapeDtypeStruct((b,), jnp.float32)}

    rev = widths[::-1]
    return {"encoder": {i: linear(a, b) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))},
            "to_code": linear(widths[-1], 1),
            "from_code": linear(1, rev[0]),
            "decoder": {i: linear(a, b) for i, (a, b) in enumerate(zip(rev[:-1], rev[1:]))}}


def decoder_layers(params: dict) -> list[tuple[jax.Array, jax.Array]]:
    """The `(kernel, bias)` pairs `decode_layers` takes, from pure-dict parameters."""
    blocks = [params["from_code"], *(params["decoder"][i] for i in sorted(params["decoder"]))]
    return [(b["kernel"], b["bias"]) for b in blocks]


def decode_codes(params: dict, negative_slope: float,
                 num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [M] float64 = linspace(0, 1, M), coords [M, k*k-1] float32)`: the decoder on the
    host in float64, each output rounded once to float32."""
    codes = np.linspace(0.0, 1.0, num_codes)
    layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64))
              for w, b in decoder_layers(params)]
    coords = decode_layers(layers, codes, float(negative_slope), xp=np)
    return codes, coords.astype(np.float32)
