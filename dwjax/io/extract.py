"""Finds depthwise-convolution kernels in a state dict (by shape) or in a torch module (by
structure).

A depthwise layer is a convolution with groups == in_channels > 1: one k×k kernel per output
channel. Both routes return the same `DepthwiseLayer` list, in network order, so the kernels a
checkpoint file yields without building a model are bitwise those the model walk yields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from dwjax.io.weight_files import LazyTensor


@dataclasses.dataclass
class DepthwiseLayer:
    """One depthwise convolution: `kernels` is `[C, kh, kw]` float32, one kernel per output channel.

    `index` counts depthwise layers of every size in network order; stride/dilation are -1 when the
    route cannot know them (a checkpoint read without its architecture).
    """
    index: int
    name: str
    kernels: np.ndarray
    stride: int = -1
    dilation: int = -1
    channels: np.ndarray | None = None  # [C] channel ids; None: 0..C-1


    @property
    def size_key(self) -> str:
        kh, kw = self.kernels.shape[1:]
        return f"{kh}x{kw}"


@dataclasses.dataclass
class TensorRef:
    """A weight known by its shape whose values `load()` reads: a graph format's regular
    convolution, `[O, I, kh, kw]` in PyTorch orientation, for `regular_sample` (which reads only
    the tensors it draws from, as it does from a `LazyTensor`)."""
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    dtype: Any = np.float32


@dataclasses.dataclass
class GraphWeights:
    """What a model-graph file (ONNX, TFLite, Keras) yields: its depthwise layers, read when the
    file is opened (they are small; a bad tensor then fails before anything is written), its
    regular convolutions by reference, and what the file says about them (`details`, recorded in
    the source's origin: `batch_norm`, the precision the weights were stored in), and the other
    files it read (an ONNX model's external data)."""
    layers: list[DepthwiseLayer]
    regular: dict[str, TensorRef]
    details: dict
    files: list[str] = dataclasses.field(default_factory=list)


def batch_norm_state(followed: list[bool]) -> str:
    """`"separate"` when a batch norm consumes every depthwise layer's output in the file (the
    kernels are the trained weights, as in a checkpoint), `"none"` when none does (an exporter
    folded it into the kernels, or the network has none), `"partly"` otherwise."""
    if followed and all(followed):
        return "separate"
    return "partly" if any(followed) else "none"


def is_depthwise_shape(shape: tuple[int, ...]) -> bool:
    # [C, 1, kh, kw] with C > 1 and a spatial extent: 1×1 "depthwise" weights (RepViT's
    # identity-like branches, layer scales stored as convs) carry no spatial pattern.
    return len(shape) == 4 and shape[0] > 1 and shape[1] == 1 and shape[2] * shape[3] > 1


def layers_from_state(tensors: Mapping[str, LazyTensor]) -> list[DepthwiseLayer]:
    """Depthwise layers of a checkpoint read lazily: only `[C,1,kh,kw]` `*.weight` tensors are
    loaded.

    Args:
      tensors: `{name: LazyTensor}` in file order (from `weight_files.open_checkpoint`).
    """
    layers = []
    for name, t in tensors.items():
        if not name.endswith("weight") or not is_depthwise_shape(tuple(t.shape)):
            continue
        if np.dtype(t.dtype if t.dtype != "bfloat16" else np.float32).kind != "f":
            continue
        w = t.load().astype(np.float32, copy=False)
        layer_name = name[: -len(".weight")] if name.endswith(".weight") else name
        layers.append(DepthwiseLayer(len(layers), layer_name, np.ascontiguousarray(w[:, 0])))
    return layers


def layers_from_module(model: Any) -> list[DepthwiseLayer]:
    """Depthwise layers of a torch module, in `named_modules` (network) order.

    Counts every `nn.Conv2d` (and subclasses: timm's Conv2dSame, the splits of MixedConv2d) with
    groups == in_channels > 1; the stem/patching layer and regular convolutions have groups == 1.
    """
    import torch

    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Conv2d):
            continue
        if not (mod.groups == mod.in_channels > 1) or not is_depthwise_shape(
            tuple(mod.weight.shape)
        ):
            continue
        w = mod.weight.detach().to(torch.float32).cpu().numpy()
        stride = mod.stride[0] if mod.stride[0] == mod.stride[1] else -1
        dilation = mod.dilation[0] if mod.dilation[0] == mod.dilation[1] else -1
        layers.append(
            DepthwiseLayer(len(layers), name, np.ascontiguousarray(w[:, 0]), stride, dilation)
        )
    return layers


def regular_sample(tensors: Mapping[str, LazyTensor], n: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """A random sample of the regular (not depthwise) convolutions' square k×k kernels (k ≥ 3) of a
    checkpoint read lazily, per size: `{"3x3": [n', 3, 3] float32}`, n' ≤ n (paper Fig. 2's
    regular-vs-depthwise comparison; never trained on or assigned).

    Each `[O, I, k, k]` weight holds O·I kernels; the sample is uniform over all of them (seeded),
    and only the tensors it draws from are read.
    """
    by_size: dict[str, list[tuple[str, int]]] = {}
    for name, t in tensors.items():
        shape = tuple(t.shape)
        if (not name.endswith("weight") or len(shape) != 4 or shape[2] != shape[3]
                or shape[2] < 3 or is_depthwise_shape(shape)):
            continue
        if np.dtype(t.dtype if t.dtype != "bfloat16" else np.float32).kind != "f":
            continue
        by_size.setdefault(f"{shape[2]}x{shape[3]}", []).append((name, shape[0] * shape[1]))
    rng = np.random.default_rng(seed)
    out = {}
    for key, parts in sorted(by_size.items()):
        sizes = np.array([c for _, c in parts])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        pick = np.sort(rng.choice(offsets[-1], min(n, offsets[-1]), replace=False))
        which = np.searchsorted(offsets, pick, side="right") - 1
        kernels = []
        for j in np.unique(which):
            name = parts[j][0]
            w = tensors[name].load().astype(np.float32, copy=False)
            flat = w.reshape(-1, w.shape[2], w.shape[3])
            kernels.append(flat[pick[which == j] - offsets[j]])
        out[key] = np.ascontiguousarray(np.concatenate(kernels), np.float32)
    return out
