"""The functional check of master key filters: does an ImageNet network still compute what it
computed once its depthwise kernels are replaced by their fits?

The embedded default's networks (torchvision's MobileNetV2 for 3×3 kernels; EfficientNet-Lite0,
whose state dict maps onto timm's `efficientnet_lite0` tensor for tensor, for 5×5) run on the
photographs scikit-image ships (offline), each seen at two scales, five 224×224 crops and their
mirror images. Every depthwise k×k kernel is replaced (`master_keys.replaced_kernels`) by

- `master keys`: its fit to the first K filters of the bank;
- `random bank`: its fit to K random centred unit filters (a control: any K filters);
- `shuffled filters`: the same bank, scales and offsets, with the filter indices permuted
  among the layer's channels (a control: does each kernel's own choice matter?).

Per K and variant: top-1 agreement with the original network and the mean cosine between the
original's and the replaced network's logits, over every view; and the mean explained fraction
r2 of the replaced kernels. torch, torchvision (timm for EfficientNet-Lite) and scikit-image are
imported only here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from dwjax.errors import UserError
from dwjax.io import sources
from dwjax.patterns import master_keys

VARIANTS = ("master keys", "random bank", "shuffled filters")
# scikit-image's bundled photographs (no download): natural scenes, objects, textures
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
               "hubble_deep_field", "retina", "immunohistochemistry", "camera", "coins", "moon",
               "brick", "grass", "gravel", "clock")
MODELS = {3: "mobilenet-v2", 5: "efficientnet-lite0"}
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CheckError(UserError):
    """The functional check cannot run here (a missing package, no model for the size)."""


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckError(f"--config.check.enabled: needs {what} (pip install {what})")


def photographs(limit: int = 0) -> dict[str, np.ndarray]:
    """`{name: [H, W, 3] uint8}`: scikit-image's bundled photographs (grey ones as RGB)."""
    data = _need("skimage.data", "scikit-image")
    out = {}
    for name in PHOTOGRAPHS:
        if name.startswith("motorcycle"):
            left, right, _ = data.stereo_motorcycle()
            img = left if name.endswith("left") else right
        else:
            img = getattr(data, name)()
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out[name] = img[:, :, :3].astype(np.uint8)
        if limit and len(out) == limit:
            break
    return out


def views(images: dict[str, np.ndarray], per_image: int = 20, size: int = 224):
    """`[V, 3, size, size]` float32 torch tensor, ImageNet-normalised: each image resized so its
    short side is 256 and 320, cropped at the four corners and the centre, each crop also
    mirrored; the first `per_image` of those per image."""
    import torch
    from torchvision.transforms import functional as TF

    mean = torch.tensor(_MEAN)[:, None, None]
    std = torch.tensor(_STD)[:, None, None]
    out = []
    for img in images.values():
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        got = []
        for short in (256, 320):
            r = TF.resize(x, short, antialias=True)
            for crop in TF.five_crop(r, size):
                got += [crop, TF.hflip(crop)]
        out += [(v - mean) / std for v in got[:per_image]]
    return torch.stack(out)


@dataclasses.dataclass
class Network:
    """A network of the embedded default: `model` (torch, eval mode), its state dict and the
    names of its depthwise k×k kernels `[C, 1, k, k]`."""
    name: str
    model: object
    state: dict
    depthwise: list[str]


def network(kernel_size: int) -> Network:
    """The embedded default's ImageNet network with k×k depthwise kernels."""
    import torch

    if kernel_size not in MODELS:
        raise CheckError(f"--config.check.enabled: no ImageNet network of the embedded default "
                         f"has {kernel_size}x{kernel_size} depthwise kernels (3×3: MobileNetV2, "
                         "5×5: EfficientNet-Lite0)")
    name = MODELS[kernel_size]
    path = _embedded_path(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name == "mobilenet-v2":
        model = _need("torchvision.models", "torchvision").mobilenet_v2()
    else:
        model = _need("timm", "timm").create_model("efficientnet_lite0", pretrained=False)
        # same tensors in the same order, other names
        state = dict(zip(model.state_dict().keys(), state.values()))
    model.load_state_dict(state)
    model.eval()
    names = [n for n, t in state.items() if n.endswith("weight") and t.ndim == 4
             and t.shape[1] == 1 and t.shape[0] > 1 and tuple(t.shape[2:]) == (kernel_size,) * 2]
    return Network(name, model, {n: t.clone() for n, t in state.items()}, names)


def _embedded_path(slug: str) -> str:
    """The weights file of an embedded-default source (`io.sources.EMBEDDED`)."""
    import importlib.util

    _, package, rel, _, _ = next(e for e in sources.EMBEDDED if e[0] == slug)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckError(f"--config.check.enabled: package {package} is not installed "
                         f"({sources.INSTALL_HINT})")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def _logits(net: Network, x, batch_size: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([net.model(x[i:i + batch_size]).double().numpy()
                               for i in range(0, len(x), batch_size)])


def _replaced(net: Network, kernels: dict[str, np.ndarray]) -> None:
    """Loads the network's state with `kernels {name: [C, k, k]}` in place of its own."""
    import torch

    state = dict(net.state)
    for name, k in kernels.items():
        state[name] = torch.from_numpy(np.asarray(k, np.float32)[:, None].copy())
    net.model.load_state_dict(state)


def _variants(kernels: np.ndarray, bank: np.ndarray, random_bank: np.ndarray,
              rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{variant: (replacement [C, k, k], r2 [C])}` of one layer's kernels."""
    flat = bank.reshape(len(bank), -1)
    fit = master_keys.fit(kernels, flat)
    index, scale, offset = fit.layer_parameters()
    rfit = master_keys.fit(kernels, random_bank.reshape(len(random_bank), -1))
    shuffled = rng.permutation(index)
    # the shuffled filter's share of each kernel's centred energy, at the kept scale
    units, live = master_keys.unit_kernels(kernels)
    r2_shuffled = np.where(live, np.square(np.sum(units * flat[shuffled], axis=1)), np.nan)
    return {"master keys": (master_keys.rebuild(bank, index, scale, offset), fit.r2),
            "random bank": (master_keys.rebuild(random_bank, *rfit.layer_parameters()), rfit.r2),
            "shuffled filters": (master_keys.rebuild(bank, shuffled, scale, offset),
                                 r2_shuffled)}


def agreement(kernel_size: int, banks: dict[int, np.ndarray], *, seed: int = 0,
              images: int = 0, views_per_image: int = 20, batch_size: int = 64,
              log: Callable[[str], None] = print) -> list[dict]:
    """The functional table: one row per K of `banks` (`{K: [K, k, k] unit centred filters}`) and
    variant: `{"network", "K", "variant", "top1_agreement", "logit_cosine", "mean_r2",
    "views"}`."""
    import torch

    net = network(kernel_size)
    x = views(photographs(images), views_per_image)
    log(f"functional check: {net.name}, {len(net.depthwise)} depthwise {kernel_size}x"
        f"{kernel_size} layers, {len(x)} views of scikit-image's photographs")
    torch.manual_seed(seed)
    base = _logits(net, x, batch_size)
    top = base.argmax(axis=1)
    rows = []
    for k_bank, bank in sorted(banks.items()):
        rng = np.random.default_rng([seed, k_bank])
        random_bank = master_keys.unit_filters(rng.standard_normal(bank.shape)).reshape(bank.shape)
        layers = {n: _variants(net.state[n].numpy()[:, 0], np.asarray(bank, np.float32),
                               random_bank.astype(np.float32), rng) for n in net.depthwise}
        for variant in VARIANTS:
            _replaced(net, {n: v[variant][0] for n, v in layers.items()})
            got = _logits(net, x, batch_size)
            cos = np.sum(got * base, axis=1) / (np.linalg.norm(got, axis=1)
                                                * np.linalg.norm(base, axis=1))
            r2 = np.concatenate([v[variant][1] for v in layers.values()])
            rows.append({"network": net.name, "K": k_bank, "variant": variant,
                         "top1_agreement": float(np.mean(got.argmax(axis=1) == top)),
                         "logit_cosine": float(np.mean(cos)), "mean_r2": float(np.nanmean(r2)),
                         "views": len(x)})
            log(f"  K={k_bank:>2} {variant:<16} top-1 agreement {rows[-1]['top1_agreement']:.3f}"
                f"  logit cosine {rows[-1]['logit_cosine']:.3f}  mean r2 "
                f"{rows[-1]['mean_r2']:.3f}")
    _replaced(net, {})
    return rows


def table_rows(rows: Sequence[dict]) -> tuple[list[str], list[list]]:
    """`(header, rows)` of functional.csv."""
    header = ["network", "K", "variant", "top1_agreement", "logit_cosine", "mean_r2", "views"]
    return header, [[r[h] for h in header] for r in rows]
