"""Advisory locks for what must not interleave: training on a run directory, the settings
check-and-write of an assignment job, the rebuild of a data directory's manifest.

`fcntl.flock` on a lock file: the kernel releases it when its process dies, so a lock left by a
killed run never blocks the next one. The file holds the holder's pid, for the refusal message.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from dwjax.errors import UserError


class Busy(UserError):
    """Another live process holds the lock."""


@contextlib.contextmanager
def exclusive(path: str, what: str, wait: bool = True) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if needed) for the block.

    `wait=False` refuses at once, naming the holder, when another process holds it.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Busy(f"{os.path.dirname(os.path.abspath(path))}: {what} is already running "
                       f"there (process {holder}); wait for it to finish or use another directory")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
