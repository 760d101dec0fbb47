"""How a search streams kernels: rows of one or more arrays ("segments": a job's parts, each a
row range of a shard) packed into chunks of one compiled shape, and read ahead on worker threads.

Packing: the chunks run over segment boundaries, so a job of many small shards pays for padding
once, in its last chunk, not once per shard (free on the pruned CPU search, full price on the
brute force that accelerators run). A row's answer does not depend on where in a chunk it sits
(nearest.py's rounding notes), so packed and unpacked jobs write the same rows.
"""
from __future__ import annotations

import concurrent.futures
from typing import Iterator, NamedTuple, Sequence

import numpy as np


class Segment(NamedTuple):
    """Rows `[start, stop)` of `kernels [N, k, k]` (an array or a read-only memmap)."""
    kernels: np.ndarray
    start: int
    stop: int


class Piece(NamedTuple):
    """Rows `[start, stop)` of segment `segment`, at rows `[at, at + stop − start)` of a chunk."""
    segment: int
    start: int
    stop: int
    at: int


def segments(spans: Sequence[tuple]) -> list[Segment]:
    """`(kernels, start, stop)` spans (stop None: the array's end, clipped to it) → Segments."""
    out = []
    for kernels, start, stop in spans:
        if start < 0:
            raise ValueError(f"start must be ≥ 0; got {start}")
        stop = len(kernels) if stop is None else min(stop, len(kernels))
        out.append(Segment(kernels, start, max(start, stop)))
    return out


def plan(segs: Sequence[Segment], rows: int) -> Iterator[list[Piece]]:
    """The chunks of `rows` rows that cover `segs` in order, each a list of Pieces; only the last
    chunk may be short (it is padded when read)."""
    pieces: list[Piece] = []
    room = rows
    for i, seg in enumerate(segs):
        a = seg.start
        while a < seg.stop:
            take = min(room, seg.stop - a)
            pieces.append(Piece(i, a, a + take, rows - room))
            a += take
            room -= take
            if room == 0:
                yield pieces
                pieces, room = [], rows
    if pieces:
        yield pieces


def read(segs: Sequence[Segment], pieces: Sequence[Piece], rows: int, k: int) -> np.ndarray:
    """One chunk's kernels `[rows, k, k]` float32; rows past the pieces are zero (padding, whose
    answers are dropped). A chunk inside one float32 array is a view of it, not a copy: the CPU
    backend then reads a memmap in place (a copy here costs more than the page faults it would
    move off the devices' threads); packed or padded chunks are fresh arrays."""
    used = pieces[-1].at + pieces[-1].stop - pieces[-1].start
    if len(pieces) == 1 and used == rows:
        p = pieces[0]
        return np.asarray(segs[p.segment].kernels[p.start:p.stop], np.float32).reshape(-1, k, k)
    host = np.empty((rows, k, k), np.float32)
    for p in pieces:
        host[p.at:p.at + p.stop - p.start] = np.asarray(
            segs[p.segment].kernels[p.start:p.stop], np.float32).reshape(-1, k, k)
    host[used:] = 0
    return host


class Readers:
    """Reads chunks on `n` worker threads (page faults and copies overlap the devices and the
    caller's writing: numpy copies release the GIL), or inline when n is 0."""

    def __init__(self, n: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(n) if n > 0 else None

    def submit(self, fn, *args) -> concurrent.futures.Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(fn(*args))
        return done

    def __enter__(self) -> "Readers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
