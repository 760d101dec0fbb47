"""Default locations: everything lives under $DWJAX_HOME (default ~/dwjax) unless a flag says otherwise."""
from __future__ import annotations

import os


def home() -> str:
    return os.path.expanduser(os.environ.get("DWJAX_HOME", "~/dwjax"))


def default_data_dir() -> str:
    """Where `convert` writes, and `train`/`assign` read, the embedded default's shards."""
    return os.path.join(home(), "data")


def default_workdir(kernel_size: int) -> str:
    return os.path.join(home(), "runs", f"k{kernel_size}")


def configs_dir() -> str:
    """The repository's `configs/` (installed beside the package as the `configs` package)."""
    import configs

    return os.path.dirname(os.path.abspath(configs.__file__))
