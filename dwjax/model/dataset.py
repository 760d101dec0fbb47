"""Training data streamed from memory-mapped kernel shards.

Kernels stay on disk (np.memmap); only the valid-kernel index (int64 per kernel) and one stack of
batches at a time are held in host memory, and the pages a read maps are released right after it
(random rows fault in read-ahead windows: an epoch would otherwise map the whole dataset), so a
large dataset is not held twice. Every epoch is a fresh
permutation drawn from (seed, epoch): a resumed run sees exactly the batches an uninterrupted one
does.
"""
from __future__ import annotations

import numpy as np

from dwjax.errors import UserError
from dwjax.io import shards
from dwjax.model import preprocess


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """`[n]` int64: the permutation of the valid kernels that epoch `epoch` visits, batch by batch
    (a function of (seed, epoch) alone, so a resumed run and the torch yardstick see the same)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class DataError(UserError):
    """No usable kernels for the asked kernel size."""


class KernelDataset:
    """All k×k kernels under `data_dir`, minus dead ones (dropped and counted).

    Attributes:
      valid_index: `[N_valid]` int64 global indices of kept kernels (over the concatenated shards).
      num_total, num_dropped: counts before and after dropping dead kernels.
      rows_read: kernels read by `gather` so far (each host reads only its own batch rows).
    """

    def __init__(self, data_dir: str, kernel_size: int, scan_chunk: int = 1 << 18):
        self.kernel_size = kernel_size
        self.shards = list(shards.iter_shards(data_dir, kernel_size))
        if not self.shards:
            have = shards.read_manifest(data_dir)["totals"]
            raise DataError(f"--data_dir {data_dir}: no {kernel_size}x{kernel_size} kernels "
                            f"(have {have}; convert a model with them first, e.g. "
                            "python -m dwjax.convert --models=convnextv2_tiny --data_dir=…)")
        sizes = np.array([len(s.kernels) for s in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        parts = []
        for s, off in zip(self.shards, self.offsets[:-1]):
            for i in range(0, len(s.kernels), scan_chunk):
                mask = preprocess.valid_mask(s.kernels[i:i + scan_chunk])
                shards.release_pages(s.kernels, i, i + scan_chunk)
                parts.append(off + i + np.flatnonzero(mask))
        self.valid_index = np.concatenate(parts).astype(np.int64)
        self.num_total = int(self.offsets[-1])
        self.num_dropped = self.num_total - len(self.valid_index)
        self.rows_read = 0
        if len(self.valid_index) == 0:
            raise DataError(f"--data_dir {data_dir}: every {kernel_size}x{kernel_size} kernel is "
                            "dead (zero/constant)")

    def __len__(self) -> int:
        return len(self.valid_index)

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Global indices `[..., B]` → kernels `[..., B, k, k]` float32, read from the memmaps.

        Each batch (last axis) is sorted for locality: a batch's order does not change its mean
        loss. One call reads a whole stack of batches (`[S, B]`), so the per-call cost is paid once.
        """
        index = np.sort(index, axis=-1)
        flat = index.reshape(-1)
        self.rows_read += len(flat)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((len(flat), self.kernel_size, self.kernel_size), np.float32)
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = shards.take_rows(self.shards[s].kernels, flat[sel] - self.offsets[s])
        return out.reshape(*index.shape, self.kernel_size, self.kernel_size)

    def release_pages(self) -> None:
        """Drops the shard pages read so far from this process's resident memory (the page cache
        keeps them): without it a run's resident set grows to the whole dataset over an epoch."""
        for s in self.shards:
            shards.release_pages(s.kernels, 0, len(s.kernels))

    def epoch_batches(self, epoch: int, seed: int, batch_size: int):
        """Yields `(step_in_epoch, global index [batch_size])`; the last partial batch is
        dropped."""
        order = epoch_order(seed, epoch, len(self.valid_index))
        for b in range(len(order) // batch_size):
            yield b, self.valid_index[order[b * batch_size:(b + 1) * batch_size]]

    def all_batches(self, batch_size: int):
        """Every valid kernel once, in order, as `(index [<=batch_size])` (for evaluation)."""
        for i in range(0, len(self.valid_index), batch_size):
            yield self.valid_index[i:i + batch_size]
