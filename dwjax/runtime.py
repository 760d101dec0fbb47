"""The process a stage runs in: the compilation cache, one JAX CPU device per core, the multi-host
start, and skipping the interpreter's final collections. Called by stages' mains only; library
code leaves jax's configuration alone."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import warnings
from typing import Iterator

from absl import flags

from dwjax.io import paths


# jax releases whose XLA:CPU logs an error line on stderr for every program it loads from the
# persistent cache (a spurious CPU-feature mismatch): there the cache is off, so a failing
# command's stderr stays its one line.
NO_CACHE_BEFORE = (0, 10)


def jax_version() -> tuple[int, ...]:
    import jax

    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def enable_compilation_cache() -> None:
    """A re-run (resume, another stage on the same run) skips compiles (not on jax before
    NO_CACHE_BEFORE, whatever JAX_COMPILATION_CACHE_DIR says)."""
    import jax

    if jax_version() < NO_CACHE_BEFORE:
        jax.config.update("jax_enable_compilation_cache", False)
        return

    # The cache only saves compile time: failing to write it (a full disk), or an entry torn by
    # one, costs a compile, not a warning.
    warnings.filterwarnings(
        "ignore", message="Error (writing|reading) persistent compilation cache"
    )
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", paths.xla_cache_dir())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def use_every_cpu_core() -> None:
    """On a CPU, one JAX device per core, for work split into per-device pieces (the nearest-code
    search's shard_map): one CPU device runs such a loop on one core. A no-op where the device
    count is already set (XLA_FLAGS) or the backend is started."""
    import jax

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
        except RuntimeError:  # backends already initialised
            pass


def skip_final_collection() -> None:
    """Call once a stage's work is done and its files are closed: every object alive then is left
    out of the interpreter's collections at exit (`gc.freeze`). With jax loaded those walk hundreds
    of thousands of objects only to free memory the exit frees anyway."""
    gc.freeze()


def define_distributed_flags() -> None:
    flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first "
                      "(auto-detects Cloud TPU pods and SLURM; else give the three flags below).")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (multi-host without auto-detection).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")


def distributed_requested() -> bool:
    return bool(flags.FLAGS.distributed or flags.FLAGS.coordinator_address)


def init_distributed() -> None:
    """Starts JAX's multi-process runtime when the distributed flags ask for it."""
    fl = flags.FLAGS
    if distributed_requested():
        import jax

        jax.distributed.initialize(fl.coordinator_address, fl.num_processes, fl.process_id)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block is held until it ends, then raised as KeyboardInterrupt: an
    interrupt inside orbax's save (its threads mid-write) could leave the process waiting on them
    forever instead of exiting. A no-op off the main thread (only it may set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
