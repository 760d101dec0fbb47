"""Atomic writes: the one way dwjax writes a plain file (orbax keeps its own).

A file is written under a hidden temp name beside its destination and renamed over it only once it
is complete, so a reader (or a re-run after a kill) sees the old file or the new one, never half of
one. Temp names carry the writer's pid (`.tmp-<pid>-<name>-<random>`): concurrent writers never
share a temp file, and `clean_stale` removes only what a dead process left behind.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"


def _prefix(name: str) -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{name[:60]}-"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a fresh temp path beside `path` (same extension, so savers that infer the format from
    it work); renames it over `path` when the block succeeds, removes it when it raises."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_prefix(os.path.basename(path)),
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are for users to open
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        named = _named_os_error(e, path)
        if named is not None:
            raise named from e
        raise


# Writers that report a full disk or file-size limit without an errno (numpy's tofile, pyarrow)
# still say so in their message.
_ERRNO_TEXT = {errno.ENOSPC: ("No space left", "errno 28"),
               errno.EFBIG: ("File too large", "errno 27"),
               errno.EDQUOT: ("Disk quota exceeded", "errno 122")}


def _named_os_error(e: BaseException, path: str) -> OSError | None:
    """An OSError that names `path` and carries its errno, when `e` is a write failure that lacks
    one of them; None when `e` is something else."""
    if not isinstance(e, OSError) or (e.errno is not None and e.filename is not None):
        return None
    code = e.errno
    if code is None:
        text = str(e)
        code = next((c for c, words in _ERRNO_TEXT.items() if any(w in text for w in words)),
                    None)
        if code is None and "requested and" in text and "written" in text:  # numpy: short write
            code = errno.ENOSPC if _full(path) else errno.EFBIG
    if code is None:
        return None
    return OSError(code, os.strerror(code), path)


def _full(path: str) -> bool:
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize < (1 << 20)


def save_npy(path: str, array) -> None:
    """`np.save`, atomically, with a write failure reported with its errno and path."""
    import numpy as np

    with atomic_path(path) as tmp:
        np.save(tmp, array)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """`open` for writing, atomically: the file appears at `path` complete, or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_json(path: str, obj: Any, indent: int = 1, sort_keys: bool = False) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, allow_nan=False)
        f.write("\n")


def save_npz(path: str, **arrays) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def temp_dir(parent: str, name: str) -> str:
    """A fresh hidden directory in `parent` owned by this process (see `clean_stale`)."""
    return tempfile.mkdtemp(dir=parent, prefix=_prefix(name))


def replace_dir(tmp: str, final: str) -> None:
    """Puts the finished directory `tmp` at `final`, replacing what is there: the old one is moved
    aside first, so a kill leaves the old or the new directory plus a stale temp, never a mix."""
    if os.path.exists(final):
        old = temp_dir(os.path.dirname(final) or ".", "old")
        os.replace(final, os.path.join(old, "x"))
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _owner_alive(entry: str) -> bool:
    try:
        pid = int(entry[len(TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False  # not ours, or an older naming scheme: no owner to wait for
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def clean_stale(folder: str) -> None:
    """Removes temp files and directories in `folder` whose writing process is gone; never
    another live process's work in progress."""
    for entry in os.listdir(folder):
        if entry.startswith(TMP_PREFIX) and not _owner_alive(entry):
            path = os.path.join(folder, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
