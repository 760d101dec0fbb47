"""What every stage's `main` shares: the one rule for errors, the terminal's log level, and the
command line of a config-driven stage (`--kernel_size`, `--config`, `--config.<field>=…`).

The rule: a `UserError` (bad flag, file or directory) becomes one line `<stage>: <message>` on
stderr and exit code 1; an OS-level failure a user can fix (permission, not a directory, disk
full, file too large) becomes one line naming the path, exit 1; Ctrl-C becomes `<stage>:
interrupted`, exit 130. Anything else raises with its traceback, because it is a bug.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import os
import signal
import sys
from typing import Callable, Iterator

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from dwjax import runtime
from dwjax.errors import ConfigError, UserError
from dwjax.io import paths

FLAGS = flags.FLAGS

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
    """For a stage run as a program (never for library calls): log level, file-size limit,
    figures without a display, and the compilation cache.

    orbax logs every save at INFO: the terminal keeps to our progress lines unless -v is given.
    """
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
    # A write past the file-size limit then raises OSError(EFBIG), one line, instead of a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Programs draw into files; library modules never pick a backend (a notebook keeps its own).
    if "matplotlib" in sys.modules:
        sys.modules["matplotlib"].use("Agg")
    else:
        os.environ.setdefault("MPLBACKEND", "Agg")
    if uses_jax:
        runtime.enable_compilation_cache()


# ----------------------------------------------------------------------------- config stages
def run_config_stage(stage: str, main: Callable[[list[str]], None],
                     define_flags: Callable[[], None], default_kernel_size: int | None = None
                     ) -> None:
    """Runs a config-driven stage as a program under absl.

    `--kernel_size` is parsed first: it picks `configs/<stage>.py:<k>` (else `default_kernel_size`,
    else `configs/<stage>.py` with no argument), so `--config` can be defined with that default and
    read its `--config.<field>=…` overrides. An unknown field gets one line with the nearest names.
    """
    flags.DEFINE_integer("kernel_size", None,
                         f"Kernel size k; picks configs/{stage}.py:k.", lower_bound=2)
    try:
        FLAGS(sys.argv, known_only=True)
    except flags.Error as e:
        fail(stage, str(e), 1)
    kernel_size = FLAGS.kernel_size or default_kernel_size
    FLAGS.unparse_flags()  # app.run parses everything once more, the config flag included
    try:  # config_flags reads the --config.<field> overrides in sys.argv as it is defined
        config_flags.DEFINE_config_file(
            "config", paths.config_file(stage, kernel_size),
            f"{stage} config (default configs/{stage}.py[:<kernel_size>]); override any field "
            "with --config.<field>=…")
    except (AttributeError, KeyError):
        fail(stage, _unknown_field(sys.argv, stage, kernel_size), 1)
    define_flags()

    def parse(argv: list[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except flags.Error as e:
            fail(stage, str(e), 1)
        except (AttributeError, KeyError):  # ml_collections: an unknown --config.<field>
            fail(stage, _unknown_field(argv, stage, kernel_size), 1)

    app.run(main, flags_parser=parse)


def run_workdir_stage(stage: str, core: Callable[..., object], what: str) -> None:
    """`run_config_stage` for a stage whose only other flag is `--workdir` (`what` it must hold):
    its main calls `core(config, workdir)`, the workdir defaulting to `$DWJAX_HOME/runs/k<k>`."""

    def define_flags() -> None:
        flags.DEFINE_string("workdir", None,
                            f"{what} (default $DWJAX_HOME/runs/k<kernel_size>).")

    def main(argv: list[str]) -> None:
        del argv
        setup()
        with user_errors(stage):
            config = stage_config()
            core(config, FLAGS.workdir or paths.default_workdir(config.kernel_size or 5))

    run_config_stage(stage, main, define_flags)


def define_workdir_flags(data: str) -> None:
    """`--workdir` and `--data_dir` (`data`: what the shards are for) as the stages on a trained
    run take them."""
    flags.DEFINE_string("workdir", None, "Run directory (default $DWJAX_HOME/runs/k<kernel_size>).")
    flags.DEFINE_string("data_dir", None,
                        f"{data} (default $DWJAX_HOME/data); any converted set.")


def end_job(summary: dict, done: Callable[[dict], str], worker_index: int, rows: str,
            verb: str) -> None:
    """The last line of a job split into parts (assign, masterkeys): `done(summary)` once every
    part is done, else what this worker did; then the exit skips the final collections."""
    if summary["complete"]:
        print(done(summary))
    else:
        print(f"worker {worker_index}: its parts are {verb}; rows in {rows}/")
    runtime.skip_final_collection()


def stage_config() -> ml_collections.ConfigDict:
    """The parsed `--config`, checked against `--kernel_size` when both name one."""
    config = FLAGS.config
    k = FLAGS.kernel_size
    if k is not None and "kernel_size" in config and config.kernel_size not in (None, k):
        raise ConfigError(f"--kernel_size {k} disagrees with --config.kernel_size "
                          f"{config.kernel_size}")
    return config


def _unknown_field(argv: list[str], stage: str, kernel_size: int | None) -> str:
    """The first `--config.<field>` the config does not have, with the nearest known names."""
    module = importlib.import_module(f"dwjax.configs.{stage}")
    arg = None if kernel_size is None else str(kernel_size)

    def fields(d, prefix=""):
        for key, value in d.items():
            yield prefix + key
            if isinstance(value, ml_collections.ConfigDict):
                yield from fields(value, f"{prefix}{key}.")

    known = list(fields(module.get_config(arg)))
    for a in argv[1:]:
        if a.startswith("--config."):
            name = a[len("--config."):].split("=", 1)[0]
            if name not in known:
                close = difflib.get_close_matches(name, known, n=2)
                hint = f" (did you mean {' or '.join('--config.' + c for c in close)}?)"
                return f"--config.{name}: unknown config field{hint if close else ''}"
    return "--config: unknown config field"
