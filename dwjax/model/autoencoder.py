"""The 1-D-code autoencoder (paper §4.1), in flax.nnx.

Input and output are kernels in hyperplane coordinates `[N, k*k-1]` (preprocess.embed). The encoder
has four hidden Dense layers with LeakyReLU and a 1-unit sigmoid code in [0, 1]; the decoder mirrors
it and ends in tanh (unit kernels have coordinates in [−1, 1]).
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from dwjax.model import decoder, preprocess


class Autoencoder(nnx.Module):
    """dim → hidden[0] → … → hidden[-1] → 1 (sigmoid) → hidden[-1] → … → hidden[0] → dim (tanh)."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 128, 64, 32),
        negative_slope: float = 0.01,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [dim, *hidden]
        self.negative_slope = negative_slope

        def dense(a: int, b: int) -> nnx.Linear:
            return nnx.Linear(a, b, precision=preprocess.PRECISION, rngs=rngs)

        self.encoder = nnx.List([dense(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.to_code = dense(widths[-1], 1)
        rev = widths[::-1]
        self.from_code = dense(1, rev[0])
        self.decoder = nnx.List([dense(a, b) for a, b in zip(rev[:-1], rev[1:])])

    def _act(self, x):
        return jax.nn.leaky_relu(x, self.negative_slope)

    def encode(self, x: jax.Array) -> jax.Array:
        """`[N, dim]` → codes `[N]` in [0, 1]."""
        for layer in self.encoder:
            x = self._act(layer(x))
        return jax.nn.sigmoid(self.to_code(x))[:, 0]

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes `[M]` → reconstructions `[M, dim]` in [−1, 1] (not unit length); the one decoder
        pass, shared with inference from saved parameters (dwjax.model.decoder)."""
        layers = [(layer.kernel[...], layer.bias[...]) for layer in (self.from_code, *self.decoder)]
        return decoder.decode_layers(layers, codes, self.negative_slope)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def _maker(kernel_size: int, hidden: Sequence[int], negative_slope: float, seed: int = 0):
    dim = kernel_size * kernel_size - 1
    return lambda: Autoencoder(dim, tuple(hidden), negative_slope, rngs=nnx.Rngs(seed))


def init_params(kernel_size: int, hidden: Sequence[int], negative_slope: float, seed: int):
    """`(graphdef, params)`: the structure (abstract, no compute) and pure-dict initial parameters.

    Initialised inside one jit: built eagerly, each layer's random init is its own small XLA
    compile; traced once it is a single program with the same values.
    """
    make = _maker(kernel_size, hidden, negative_slope, seed)
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())))()
    return graphdef, params


def graphdef(kernel_size: int, hidden: Sequence[int], negative_slope: float):
    """The model's structure alone (abstract: no parameters are computed)."""
    return nnx.split(nnx.eval_shape(_maker(kernel_size, hidden, negative_slope)))[0]


def merge(graphdef, params) -> Autoencoder:
    """A usable model from its structure and pure-dict parameters (host or device arrays)."""
    return nnx.merge(graphdef, nnx.State(params))

