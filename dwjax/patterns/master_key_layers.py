"""Frozen master-key depthwise layers, for Flax NNX and torch: the bank fixed, each channel's
filter index fixed, its scale and offset learnable. Channel c's kernel is
scale[c]·bank[index[c]] + offset[c] (`master_keys.rebuild`, float32, one rounding per operation),
so a layer built from a fit gives exactly the depthwise outputs of the checkpoint whose kernels
were replaced by that fit (`masterkeys --replace`).

DoG-init's conventions (`patterns.dog_init`):

* Flax: `MasterKeyConv(bank, index, scale, offset, …)` is the layer (NHWC in and out, its kernel
  HWIO `[k, k, 1, C]` as a depthwise `nnx.Conv`'s); `MasterKeyConv.from_conv(conv, bank)` fits a
  depthwise `nnx.Conv`; `master_keys_nnx_(model, bank)` replaces every depthwise `nnx.Conv` of
  the bank's size in place.
* torch: `MasterKeyConv2d(bank, index, scale, offset, …)` and `MasterKeyConv2d.from_conv(conv,
  bank)`; `master_keys_(model, bank)` replaces every depthwise `nn.Conv2d` of the bank's size.

The bank and the index are not parameters (an nnx `BankFilters` variable, torch buffers), so an
optimizer over `nnx.Param` or `model.parameters()` trains only the scales and offsets.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dwjax.io.extract import is_depthwise_shape
from dwjax.patterns import master_keys


def _fit_layer(kernels: np.ndarray, bank: np.ndarray):
    """`(bank [K, k, k] float32, index, scale, offset [C])` for depthwise kernels `[C, k, k]`."""
    bank = np.asarray(bank, np.float32)
    fit = master_keys.fit(kernels, bank.reshape(len(bank), -1))
    return (bank, *fit.layer_parameters())


# ------------------------------------------------------------------------------------------- Flax
def _nnx_class():
    from flax import nnx

    class BankFilters(nnx.Variable):
        """The fixed bank and filter indices: not an `nnx.Param`, so optimizers leave them."""

    class MasterKeyConv(nnx.Module):
        """A depthwise convolution whose kernels are scale·bank[index] + offset per channel.

        Args:
          bank: `[K, k, k]` filters (fixed).
          index: `[C]` int, each channel's filter (fixed).
          scale, offset: `[C]` float, learnable.
          strides, padding, kernel_dilation: as `nnx.Conv`'s (NHWC input).
          use_bias, bias: an optional per-channel bias after the convolution, learnable.
        """

        def __init__(self, bank, index, scale, offset, *, strides=1, padding="SAME",
                     kernel_dilation=1, feature_group_count: int | None = None,
                     use_bias: bool = False, bias=None):
            import jax.numpy as jnp

            self.bank = BankFilters(jnp.asarray(np.asarray(bank, np.float32)))
            self.index = BankFilters(jnp.asarray(np.asarray(index, np.int32)))
            self.scale = nnx.Param(jnp.asarray(np.asarray(scale, np.float32)))
            self.offset = nnx.Param(jnp.asarray(np.asarray(offset, np.float32)))
            self.bias = (nnx.Param(jnp.zeros(len(index), jnp.float32) if bias is None
                                   else jnp.asarray(bias, jnp.float32)) if use_bias else None)
            self.strides, self.padding, self.kernel_dilation = strides, padding, kernel_dilation
            # input channels: C, or C / m for a depth multiplier m
            self.feature_group_count = feature_group_count or len(index)

        @classmethod
        def from_conv(cls, conv, bank) -> "MasterKeyConv":
            """Fits a depthwise `nnx.Conv` (kernel `[k, k, 1, C]`) to `bank [K, k, k]`; keeps its
            strides, padding, dilation and bias."""
            w = np.asarray(conv.kernel[...], np.float32)
            kernels = np.transpose(w[:, :, 0], (2, 0, 1))
            b, index, scale, offset = _fit_layer(kernels, bank)
            bias = None if conv.bias is None else np.asarray(conv.bias[...])
            return cls(b, index, scale, offset, strides=conv.strides, padding=conv.padding,
                       kernel_dilation=conv.kernel_dilation,
                       feature_group_count=conv.feature_group_count, use_bias=bias is not None,
                       bias=bias)

        def kernel(self):
            """`[k, k, 1, C]` HWIO, float32: scale·bank[index] + offset."""
            import jax.numpy as jnp

            k = self.scale[...][:, None, None] * self.bank[...][self.index[...]]
            k = k + self.offset[...][:, None, None]
            return jnp.transpose(k, (1, 2, 0))[:, :, None, :]

        def __call__(self, x):
            import jax
            import jax.numpy as jnp

            from dwjax.model import preprocess

            def pair(v):
                v = 1 if v is None else v
                return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

            padding = self.padding
            if isinstance(padding, int):
                padding = [(padding, padding)] * 2
            y = jax.lax.conv_general_dilated(
                jnp.asarray(x, jnp.float32), self.kernel(), window_strides=pair(self.strides),
                padding=padding, rhs_dilation=pair(self.kernel_dilation),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.feature_group_count, precision=preprocess.PRECISION)
            return y if self.bias is None else y + self.bias[...]

    return BankFilters, MasterKeyConv


def __getattr__(name: str):
    # the nnx classes are built on first use: importing this module needs neither flax nor torch
    if name in ("MasterKeyConv", "BankFilters"):
        bank_filters, conv = _nnx_class()
        globals().update(BankFilters=bank_filters, MasterKeyConv=conv)
        return globals()[name]
    if name == "MasterKeyConv2d":
        globals()[name] = _torch_class()
        return globals()[name]
    raise AttributeError(name)


def master_keys_nnx_(model: Any, bank) -> dict:
    """Replaces, in place, every depthwise `nnx.Conv` of `model` whose kernel is k×k (k = the
    bank's) with a `MasterKeyConv` fitted to it. Returns `{layer path: channels}`."""
    from flax import nnx

    conv_class = __getattr__("MasterKeyConv")
    k = np.asarray(bank).shape[-1]
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv) and path:
            shape = tuple(node.kernel[...].shape)
            if (node.feature_group_count == node.in_features > 1 and len(shape) == 4
                    and shape[:3] == (k, k, 1)):
                found.append((path, node))
    done = {}
    for path, node in found:
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        new = conv_class.from_conv(node, bank)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
        done[".".join(str(p) for p in path)] = int(node.kernel[...].shape[3])
    return done


# ------------------------------------------------------------------------------------------ torch
def _torch_class():
    import torch
    import torch.nn.functional as F

    class MasterKeyConv2d(torch.nn.Module):
        """A depthwise `nn.Conv2d` whose kernels are scale·bank[index] + offset per channel.

        Buffers `bank [K, k, k]` and `index [C]` (fixed); parameters `scale`, `offset` `[C]`
        (and `bias`, when the convolution had one).
        """

        def __init__(self, bank, index, scale, offset, stride=1, padding=0, dilation=1,
                     bias=None, padding_mode: str = "zeros", groups: int | None = None):
            super().__init__()
            self.register_buffer("bank", torch.as_tensor(np.asarray(bank, np.float32)))
            self.register_buffer("index", torch.as_tensor(np.asarray(index, np.int64)))
            self.scale = torch.nn.Parameter(torch.as_tensor(np.asarray(scale, np.float32)))
            self.offset = torch.nn.Parameter(torch.as_tensor(np.asarray(offset, np.float32)))
            self.bias = None if bias is None else torch.nn.Parameter(
                torch.as_tensor(np.asarray(bias, np.float32)))
            self.stride, self.padding, self.dilation = stride, padding, dilation
            self.groups = groups or len(index)  # input channels (C / m for a multiplier m)
            if padding_mode != "zeros":
                raise ValueError(f"padding_mode {padding_mode!r}: only 'zeros' is supported")

        @classmethod
        def from_conv(cls, conv, bank) -> "MasterKeyConv2d":
            """Fits a depthwise `nn.Conv2d` (weight `[C, 1, k, k]`) to `bank [K, k, k]`."""
            w = conv.weight.detach().cpu().float().numpy()[:, 0]
            b, index, scale, offset = _fit_layer(w, bank)
            bias = None if conv.bias is None else conv.bias.detach().cpu().numpy()
            return cls(b, index, scale, offset, conv.stride, conv.padding, conv.dilation, bias,
                       conv.padding_mode, conv.groups).to(conv.weight.device)

        def weight(self):
            """`[C, 1, k, k]`: scale·bank[index] + offset."""
            k = self.scale[:, None, None] * self.bank[self.index]
            return (k + self.offset[:, None, None])[:, None]

        def forward(self, x):
            return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding,
                            self.dilation, groups=self.groups)

    return MasterKeyConv2d


def master_keys_(model: Any, bank) -> dict:
    """Replaces, in place, every depthwise `nn.Conv2d` of a torch `model` whose kernel is k×k
    (k = the bank's) with a `MasterKeyConv2d` fitted to it. Returns `{module name: channels}`."""
    import torch

    conv_class = __getattr__("MasterKeyConv2d")
    k = np.asarray(bank).shape[-1]
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Conv2d) and mod.groups == mod.in_channels > 1
             and is_depthwise_shape(tuple(mod.weight.shape))
             and tuple(mod.weight.shape[2:]) == (k, k)]
    done = {}
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, conv_class.from_conv(mod, bank))
        done[name] = int(mod.weight.shape[0])
    return done
