"""The 1-D-code autoencoder (paper §4.1), in flax.nnx.

Input and output are kernels in hyperplane coordinates `[N, k*k-1]` (preprocess.embed). The encoder
has four hidden Dense layers with LeakyReLU and a 1-unit sigmoid code in [0, 1]; the decoder mirrors
it and ends in tanh (unit kernels have coordinates in [−1, 1]).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Autoencoder(nnx.Module):
    """dim → hidden[0] → … → hidden[-1] → 1 (sigmoid) → hidden[-1] → … → hidden[0] → dim (tanh)."""

    def __init__(self, dim: int, hidden: Sequence[int] = (256, 128, 64, 32), negative_slope: float = 0.01,
                 *, rngs: nnx.Rngs):
        widths = [dim, *hidden]
        self.negative_slope = negative_slope
        self.encoder = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.to_code = nnx.Linear(widths[-1], 1, rngs=rngs)
        rev = widths[::-1]
        self.from_code = nnx.Linear(1, rev[0], rngs=rngs)
        self.decoder = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(rev[:-1], rev[1:])])

    def _act(self, x):
        return jax.nn.leaky_relu(x, self.negative_slope)

    def encode(self, x: jax.Array) -> jax.Array:
        """`[N, dim]` → codes `[N]` in [0, 1]."""
        for layer in self.encoder:
            x = self._act(layer(x))
        return jax.nn.sigmoid(self.to_code(x))[:, 0]

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes `[M]` → reconstructions `[M, dim]` in [−1, 1] (not unit length)."""
        x = self._act(self.from_code(codes[:, None]))
        for layer in self.decoder[:-1]:
            x = self._act(layer(x))
        return jnp.tanh(self.decoder[-1](x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def init_params(kernel_size: int, hidden: Sequence[int], negative_slope: float, seed: int):
    """`(graphdef, params)`: the structure (abstract, no compute) and pure-dict initial parameters.

    Initialised inside one jit: built eagerly, each layer's random init is its own small XLA compile
    (~2 s in all on a CPU); traced once it is a single program with the same values.
    """
    def make():
        return Autoencoder(kernel_size * kernel_size - 1, tuple(hidden), negative_slope, rngs=nnx.Rngs(seed))

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())))()
    return graphdef, params


def architecture(config) -> dict:
    """What a checkpoint must match to be restored into this config (kernel size and widths)."""
    return {"kernel_size": int(config.kernel_size), "hidden": [int(h) for h in config.model.hidden],
            "negative_slope": float(config.model.negative_slope)}
