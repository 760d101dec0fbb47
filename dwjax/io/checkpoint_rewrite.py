"""A copy of a weights file with its depthwise kernels rewritten in place, every other byte kept.

`rewrite_depthwise(src, dst, k, replace)` copies a `.safetensors`, a zip-format `.pth/.pt/.bin` or
a legacy-format `.pth` (what `weight_files.open_checkpoint` reads, wrapped training checkpoints
included) and overwrites, inside the copy, the bytes of every depthwise k×k kernel tensor
(`[C, 1, k, k]`, a floating `*weight`, as `extract.layers_from_state` finds them) with
`replace(name, kernels [C, k, k] float32)`, cast to the tensor's own dtype. Nothing is
re-serialised: the copy has the same layout and every other tensor is byte-equal. A zip-format
file's CRC-32 of each rewritten storage entry is updated (local header, data descriptor when
there is one, central directory), so zip readers and `torch.load` accept it.

Why in place rather than `torch.load` + `torch.save`: no torch needed, no change to anything but
the kernels (a re-save changes the pickle, the storage layout and the format version), and a
multi-GB checkpoint is rewritten without loading it.
"""
from __future__ import annotations

import os
import shutil
import struct
import zipfile
import zlib
from typing import Callable

import numpy as np

from dwjax.errors import CheckpointError
from dwjax.io import atomic, weight_files
from dwjax.io.extract import is_depthwise_shape
from dwjax.io.weight_files import LazyTensor


def depthwise_tensors(tensors: dict[str, LazyTensor], k: int) -> dict[str, LazyTensor]:
    """The depthwise k×k kernel tensors of an opened checkpoint, in file order."""
    out = {}
    for name, t in tensors.items():
        shape = tuple(t.shape)
        if (name.endswith("weight") and is_depthwise_shape(shape) and shape[2] == shape[3] == k
                and np.dtype(np.float32 if t.dtype == "bfloat16" else t.dtype).kind == "f"):
            out[name] = t
    return out


def _encode(values: np.ndarray, dtype) -> np.ndarray:
    """float32 values in the tensor's stored dtype (bfloat16: round to nearest even, as uint16)."""
    if dtype == "bfloat16":
        u = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.asarray(values).astype(dtype)


def _write(path: str, t: LazyTensor, values: np.ndarray) -> tuple[int, int]:
    """Writes `values` (shaped like `t`) into the file `path` where `t` lives; returns the byte
    range `[lo, hi)` it may have touched."""
    dt = np.dtype(np.uint16) if t.dtype == "bfloat16" else np.dtype(t.dtype)
    storage = np.memmap(path, dtype=dt, mode="r+", offset=t.file_offset, shape=(t.storage_numel,))
    shape = tuple(t.shape)
    stride = t.stride or tuple(int(np.prod(shape[i + 1:], dtype=np.int64))
                               for i in range(len(shape)))
    view = np.lib.stride_tricks.as_strided(storage[t.storage_offset:], shape=shape,
                                           strides=tuple(s * dt.itemsize for s in stride))
    view[...] = _encode(values, t.dtype)
    storage.flush()
    del view, storage
    last = t.storage_offset + sum((s - 1) * st for s, st in zip(shape, stride))
    return (t.file_offset + t.storage_offset * dt.itemsize,
            t.file_offset + (last + 1) * dt.itemsize)


def _fix_zip_crcs(path: str, touched: list[tuple[int, int]]) -> None:
    """Recomputes the CRC-32 of every stored zip entry whose data overlaps a touched byte range
    and writes it where the format keeps it."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    with open(path, "r+b") as f:
        fixed = {}
        for info in infos:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            begin = info.header_offset + 30 + name_len + extra_len
            end = begin + info.compress_size
            if not any(lo < end and hi > begin for lo, hi in touched):
                continue
            f.seek(begin)
            crc = 0
            left = end - begin
            while left:
                block = f.read(min(left, 1 << 24))
                crc = zlib.crc32(block, crc)
                left -= len(block)
            f.seek(info.header_offset + 14)
            f.write(struct.pack("<I", crc))
            if info.flag_bits & 0x08:  # a data descriptor follows the data
                f.seek(end)
                sig = f.read(4)
                f.seek(end + 4 if sig == b"PK\x07\x08" else end)
                f.write(struct.pack("<I", crc))
            fixed[info.filename] = crc
        # the central directory: one record per entry, its CRC at +16
        f.seek(start_dir)
        while fixed:
            rec = f.read(46)
            if rec[:4] != b"PK\x01\x02":
                raise CheckpointError(f"{path}: unexpected zip central directory layout")
            name_len, extra_len, comment_len = struct.unpack("<HHH", rec[28:34])
            name = f.read(name_len).decode("utf-8", "replace")
            here = f.tell()
            if name in fixed:
                f.seek(here - name_len - 46 + 16)
                f.write(struct.pack("<I", fixed.pop(name)))
            f.seek(here + extra_len + comment_len)


def rewrite_depthwise(src: str, dst: str, kernel_size: int,
                      replace: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, int]:
    """Writes `dst`, a copy of the weights file `src` whose depthwise k×k kernels are
    `replace(name, kernels [C, k, k] float32) → [C, k, k]`; returns `{tensor name: C}`.

    `dst` appears whole or not at all (`atomic`). Raises CheckpointError (one line, naming the
    file) for an unreadable checkpoint, one without k×k depthwise kernels, or `dst` = `src`.
    """
    tensors = depthwise_tensors(weight_files.open_checkpoint(src), kernel_size)
    if not tensors:
        raise CheckpointError(f"{src}: no {kernel_size}x{kernel_size} depthwise kernels "
                              "([C, 1, k, k] weights) to replace")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise CheckpointError(f"--out {dst}: is the checkpoint itself; write the copy elsewhere")
    with open(src, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    done = {}
    with atomic.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        touched = []
        for name, t in tensors.items():
            kernels = t.load().astype(np.float32, copy=False)[:, 0]
            new = np.asarray(replace(name, kernels), np.float32)
            if new.shape != kernels.shape:
                raise ValueError(f"{name}: replacement of shape {new.shape}, expected "
                                 f"{kernels.shape}")
            touched.append(_write(tmp, t, new[:, None]))
            done[name] = int(kernels.shape[0])
        if zipped:
            _fix_zip_crcs(tmp, touched)
    return done
