"""Writing a worker's parts from one stream of rows (`dwjax.assign`): each part's rows gathered
into blocks and written on a writer thread, in order, and the job's progress line.
"""
from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Callable, Iterator

from dwjax.io import assignment_files
from dwjax.io.assignment_rows import Rows


class Progress:
    """Kernels done / total, kernels/s and ETA, per part and for the job, every `every` seconds."""

    def __init__(self, total: int, log: Callable[[str], None], every: float = 10.0):
        self.total, self.log, self.every = total, log, every
        self.done, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()

    def update(self, part: assignment_files.Part, part_done: int, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        size = part.stop - part.start
        self.log(f"  {part.shard.source} [{part.start:,}, {part.stop:,}): {part_done:,}/{size:,} "
                 f"| job {self.done:,}/{self.total:,} ({self.done / max(self.total, 1):.0%}), "
                 f"{rate:,.0f} kernels/s, ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s")


def write_part(rows_iter: Iterator[Rows], part: assignment_files.Part,
                writer: assignment_files.PartWriter, block: int, progress: Progress,
                write_pool: concurrent.futures.Executor | None) -> None:
    """Streams one part's rows to its file: rows are gathered into blocks of at least `block`
    (one Parquet row group each) and written, on `write_pool`'s thread when given, while the
    devices search on; memory depends on the block, not on the shard."""
    held: list[Rows] = []
    n_held = done = 0
    writes: collections.deque = collections.deque()

    def flush() -> None:
        if write_pool is None:
            writer.write(held)
            return
        writes.append(write_pool.submit(writer.write, held))
        while len(writes) > 2:  # bounded: memory stays a few blocks
            writes.popleft().result()

    try:
        for rows in rows_iter:
            held.append(rows)
            n_held += len(rows.code)
            progress.update(part, done + n_held, len(rows.code))
            if n_held >= block:
                flush()
                done += n_held
                held, n_held = [], 0
        if held:
            flush()
    finally:  # the part's file closes only after its last block is written (or has failed)
        concurrent.futures.wait(writes)
    for w in writes:
        w.result()


def rows_of(stream: Iterator[tuple[int, Rows]], i: int, n: int) -> Iterator[Rows]:
    """The next `n` rows of `stream`, which must be span `i`'s: exactly the part's rows, so the
    next part's are not read while this part's file is open (an error there cannot cost this
    part)."""
    got = 0
    while got < n:
        j, rows = next(stream)
        assert j == i, (j, i)
        got += len(rows.code)
        yield rows
