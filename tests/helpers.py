"""Small builders shared by tests."""
import os

import numpy as np

from dwjax import convert
from dwjax.io import sources


def make_data_dir(tmp_path, kernels_by_source: dict, layers: dict | None = None) -> str:
    """Writes each `{name: [N,k,k]}` as an .npz and converts them all into `<tmp>/data`."""
    os.makedirs(str(tmp_path), exist_ok=True)
    srcs = []
    for name, kernels in kernels_by_source.items():
        path = os.path.join(str(tmp_path), f"{name}.npz")
        extra = {"layer": layers[name]} if layers and name in layers else {}
        np.savez(path, kernels=kernels, **extra)
        srcs.append(sources.npz_source(path))
    d = os.path.join(str(tmp_path), "data")
    convert.convert(d, srcs, log=lambda *_: None)
    return d
