"""What every stage's `main` shares: log level, the compilation cache, multi-host start, default
directories, the embedded-default conversion, and the one rule for errors.

The rule: a `UserError` (bad flag, file or directory) becomes one line `<stage>: <message>` on
stderr and exit code 1; an OS-level failure a user can fix (permission, not a directory, disk
full, file too large) becomes one line naming the path, exit 1; Ctrl-C becomes `<stage>:
interrupted`, exit 130. Anything else raises with its traceback, because it is a bug.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import sys
import warnings
from typing import Callable, Iterator

from absl import flags, logging

from dwjax.errors import UserError
from dwjax.io import paths, shards, sources

# Failures of the environment, not of dwjax: each names a path the user can fix.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC,
                   errno.EROFS, errno.EFBIG, errno.EDQUOT, errno.ENAMETOOLONG}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(stage: str, message: str, code: int) -> None:
    print(f"{stage}: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(stage: str) -> Iterator[None]:
    """Turns what a user can cause into one line and an exit code; lets bugs raise."""
    try:
        yield
    except UserError as e:
        fail(stage, str(e), 1)
    except KeyboardInterrupt:
        # Every writer has already removed its temp file on the way up. Exit at once: tearing
        # down the interpreter with XLA or orbax threads mid-operation can crash (a segfault that
        # would replace exit code 130).
        print(f"{stage}: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = e.filename if e.filename is not None else "?"
        fail(stage, f"{where}: {e.strerror or e}", 1)


def setup(uses_jax: bool = True) -> None:
    """Log level and compilation cache, for a stage run as a program (never for library calls).

    orbax logs every save at INFO: the terminal keeps to our progress lines unless -v is given.
    """
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
    # A write past the file-size limit then raises OSError(EFBIG), one line, instead of a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if not uses_jax:
        return
    import jax

    # The cache only saves compile time: failing to write it (a full disk), or an entry torn by
    # one, costs a compile, not a warning.
    warnings.filterwarnings(
        "ignore", message="Error (writing|reading) persistent compilation cache"
    )

    # A re-run (resume, another stage on the same run) skips compiles; library code leaves jax's
    # configuration alone.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", paths.xla_cache_dir())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def skip_final_collection() -> None:
    """Call once a stage's work is done and its files are closed: every object alive then is left
    out of the interpreter's collections at exit (`gc.freeze`). With jax loaded those walk hundreds
    of thousands of objects, a noticeable part of a short command's time, only to free memory the
    exit frees anyway."""
    gc.freeze()


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


def data_dir_or_default(data_dir: str | None, log: Callable[[str], None] = print) -> str:
    """`data_dir`, or the embedded default's shards (converted first if they are missing)."""
    if data_dir is not None:
        return data_dir
    data_dir = paths.default_data_dir()
    if not shards.has_manifest(data_dir):
        log(f"no kernel shards in {data_dir}: converting the embedded default first")
        shards.add_sources(data_dir, sources.embedded_sources(), log=log,
                           regular_sample=shards.DEFAULT_REGULAR_SAMPLE)
    return data_dir
