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


def enable_compilation_cache() -> None:
    """Persistent XLA cache under $DWJAX_HOME/xla_cache: a re-run (resume, another stage on the same
    run) skips the ~1 s compiles. Called by the stage mains only; library code leaves jax's config alone."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(home(), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
