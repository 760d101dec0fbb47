"""Shared fixtures: the embedded default converted once, and the default 5×5 run trained once."""
import os
import subprocess
import sys

import pytest

# Tests never touch the user's ~/dwjax.
os.environ.setdefault("DWJAX_HOME", os.path.join(os.path.dirname(__file__), ".dwjax_test_home"))
# Many tests train the same small shapes, in-process and in subprocesses: share compiled programs.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["DWJAX_HOME"], "xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    """The embedded default (EfficientNet-Lite0/1/2, MobileNetV2) as kernel shards."""
    from dwjax import convert
    from dwjax.io import shards, sources

    try:
        srcs = sources.embedded_sources()
    except sources.SourceError as e:  # a device image without the weight packages
        pytest.skip(str(e))
    d = str(tmp_path_factory.mktemp("embedded") / "data")
    convert.convert(d, srcs, log=lambda *_: None,
                    regular_sample=shards.DEFAULT_REGULAR_SAMPLE)
    return d


@pytest.fixture(scope="session")
def default_run_k5(embedded_dir, tmp_path_factory):
    """`python -m dwjax.train --kernel_size=5`'s config on the embedded default, trained once."""
    from dwjax.configs import train as train_configs

    from dwjax import train

    workdir = str(tmp_path_factory.mktemp("run_k5"))
    return train.run(
        train_configs.get_config("5"), workdir, embedded_dir, log=lambda *_: None
    )


def run_module(module, *args, env=None, timeout=600):
    """Runs `python -m module args…`; returns CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
