"""Small builders shared by tests."""
import os

import numpy as np
import pytest

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


def stage_config(stage: str, arg: str | None = None, **fields):
    """`configs/<stage>.py`'s config with fields set; `job__part_size=8` sets `job.part_size`."""
    import importlib

    config = importlib.import_module(f"dwjax.configs.{stage}").get_config(arg)
    for name, value in fields.items():
        *path, leaf = name.split("__")
        node = config
        for p in path:
            node = node[p]
        node[leaf] = value
    return config



# Tests of a property of XLA:CPU (its GEMMs round alike whatever the shapes, so the pruned search
# equals brute force bit for bit; auto picks the pruned search there): skipped on accelerators,
# where `launch/device_check.sh` runs everything else. The condition is evaluated at setup, so
# collecting tests does not start a jax backend.
cpu_only = pytest.mark.skipif("__import__('jax').default_backend() != 'cpu'",
                              reason="asserts a property of the CPU backend")


def run_convert(*args, timeout: int = 300):
    """`python -m dwjax.convert args…` from the repository root (this checkout's dwjax)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dwjax.convert", *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


def assert_checkpoint_refused(path: str, out, words: str) -> None:
    """`convert --checkpoint=path` fails with one line naming the file and `words`, and leaves no
    data directory."""
    r = run_convert(f"--checkpoint={path}", f"--data_dir={out}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"convert: --checkpoint {path}: ") and words in lines[0]
    assert not os.path.exists(out)


def converted_entry(path: str, out) -> dict:
    """`convert --checkpoint=path` into `out`; the one source's manifest entry."""
    import json

    r = run_convert(f"--checkpoint={path}", f"--data_dir={out}")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "manifest.json")) as f:
        (entry,) = json.load(f)["sources"]
    return entry


def train_briefly(data: str, workdir: str, epochs: int = 2) -> str:
    """A 5×5 run trained for `epochs` on `data` with small batches (test fixtures)."""
    from dwjax import train
    from dwjax.configs import train as train_configs

    c = train_configs.get_config("5")
    c.num_epochs, c.batch_size, c.eval_batch_size = epochs, 64, 512
    train.run(c, workdir, data, log=lambda *_: None)
    return workdir
