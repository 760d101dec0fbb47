"""Default locations: everything lives under $DWJAX_HOME (default ~/dwjax) unless a flag says
otherwise; and where the stage configs are."""
from __future__ import annotations

import os


def home() -> str:
    return os.path.expanduser(os.environ.get("DWJAX_HOME", "~/dwjax"))


def default_data_dir() -> str:
    """Where `convert` writes, and `train`/`assign` read, the embedded default's shards."""
    return os.path.join(home(), "data")


def default_workdir(kernel_size: int) -> str:
    return os.path.join(home(), "runs", f"k{kernel_size}")


def xla_cache_dir() -> str:
    return os.path.join(home(), "xla_cache")


def configs_dir() -> str:
    """The repository's `configs/`, installed as `dwjax.configs` (editable or wheel alike)."""
    from dwjax import configs

    return os.path.dirname(os.path.abspath(configs.__file__))


def config_file(stage: str, kernel_size: int | None = None) -> str:
    """`configs/<stage>.py[:<k>]`, as `--config` takes it."""
    path = os.path.join(configs_dir(), f"{stage}.py")
    return path if kernel_size is None else f"{path}:{kernel_size}"
