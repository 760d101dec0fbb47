"""Kernel shards on disk: one directory per source, one memory-mappable `.npy` per kernel size.

Layout (BUILD_NOTES.md, "Kernel shards"):

    <data_dir>/manifest.json              every source: id, dir, counts, files with sha256
    <data_dir>/<slug>/source.json         that source's entry + its depthwise-layer table
    <data_dir>/<slug>/k5x5.npy            float32 [n, 5, 5] kernels, network order
    <data_dir>/<slug>/k5x5.meta.npy       structured [n]: layer (int32), channel (int32)

A source is written into a hidden temp directory and renamed into place, then the manifest is
rebuilt from every `source.json` and renamed over the old one: a killed run leaves no partial shard,
and a re-run ends with exactly the manifest an uninterrupted run writes (it holds no timestamps).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import re
import shutil
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from dwjax import __version__
from dwjax.errors import UserError
from dwjax.io import atomic, locks
from dwjax.io.extract import DepthwiseLayer

FORMAT = "dwjax-kernels/1"
META_DTYPE = np.dtype([("layer", "<i4"), ("channel", "<i4")])
# Regular-convolution kernels kept per source and size, where the route can read them (Fig. 2).
DEFAULT_REGULAR_SAMPLE = 256


class ShardError(UserError):
    """The data directory is unwritable, inconsistent, or lacks what was asked for."""


def source_dir(data_dir: str, shard_dir: str) -> str:
    return os.path.join(data_dir, shard_dir)


def kernel_file(data_dir: str, shard_dir: str, kernel_size: int) -> str:
    """`<data_dir>/<shard_dir>/k<k>x<k>.npy`: float32 `[n, k, k]`."""
    return os.path.join(data_dir, shard_dir, f"k{kernel_size}x{kernel_size}.npy")


def read_regular(data_dir: str, shard_dir: str, kernel_size: int) -> np.ndarray | None:
    """The source's sample of regular-convolution k×k kernels `[n, k, k]`, or None."""
    path = os.path.join(data_dir, shard_dir, f"regular_k{kernel_size}x{kernel_size}.npy")
    return np.load(path) if os.path.exists(path) else None


def meta_file(data_dir: str, shard_dir: str, kernel_size: int) -> str:
    return os.path.join(data_dir, shard_dir, f"k{kernel_size}x{kernel_size}.meta.npy")


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:120] or "source"


def ensure_writable(data_dir: str) -> None:
    """Creates `data_dir` if needed; raises ShardError (one line) if it cannot be written."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        os.rmdir(atomic.temp_dir(data_dir, "probe"))
    except OSError as e:
        raise ShardError(f"--data_dir {data_dir}: not writable ({e.strerror or e})")


def source_complete(
    data_dir: str, slug: str, source_id: str, input_sha256: str | None = None
) -> bool:
    """True if `<slug>/` holds this source fully written, from the same input file (`input_sha256`,
    when the source is a file: an .npz rewritten under the same name is converted again), and every
    shard file matches its sha256."""
    path = os.path.join(data_dir, slug, "source.json")
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return False
    if entry.get("id") != source_id or entry.get("origin", {}).get("sha256") != input_sha256:
        return False
    for name, info in entry.get("files", {}).items():
        p = os.path.join(data_dir, slug, name)
        if not os.path.exists(p) or sha256_file(p) != info["sha256"]:
            return False
    return True


def write_source(data_dir: str, slug: str, source_id: str, origin: dict,
                 layers: list[DepthwiseLayer], regular: dict | None = None) -> dict:
    """Writes one source's kernels grouped by size; returns its manifest entry.

    Square sizes go to `k{k}x{k}.npy`; non-square ones (inception_next's 1×11) to `k{kh}x{kw}.npy`,
    listed apart under `nonsquare` in the entry so no stage mixes them in. `regular` (a sample of
    the regular convolutions' kernels per size, `extract.regular_sample`) goes to
    `regular_k{k}x{k}.npy`, listed under `regular`: kept apart, never trained on or assigned.
    """
    groups: dict[str, list[DepthwiseLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.size_key, []).append(layer)
    tmp = atomic.temp_dir(data_dir, slug[:40])
    try:
        entry = _write_files(tmp, slug, source_id, origin, layers, groups, regular or {})
        atomic.replace_dir(tmp, os.path.join(data_dir, slug))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _write_files(tmp: str, slug: str, source_id: str, origin: dict, layers: list[DepthwiseLayer],
                 groups: dict[str, list[DepthwiseLayer]], regular: dict) -> dict:
    files, counts = {}, {}
    for key, kernels in regular.items():
        name = f"regular_k{key}.npy"
        atomic.save_npy(os.path.join(tmp, name), kernels)
        files[name] = {"sha256": sha256_file(os.path.join(tmp, name)), "shape": list(kernels.shape)}
    for key, group in groups.items():
        kernels = np.concatenate([g.kernels for g in group]).astype(np.float32, copy=False)
        meta = np.zeros(len(kernels), META_DTYPE)
        meta["layer"] = np.concatenate([np.full(len(g.kernels), g.index) for g in group])
        meta["channel"] = np.concatenate(
            [np.arange(len(g.kernels)) if g.channels is None else g.channels for g in group])
        for name, arr in ((f"k{key}.npy", kernels), (f"k{key}.meta.npy", meta)):
            atomic.save_npy(os.path.join(tmp, name), arr)
            files[name] = {"sha256": sha256_file(os.path.join(tmp, name)), "shape": list(arr.shape)}
        counts[key] = int(len(kernels))
    entry = {
        "id": source_id,
        "dir": slug,
        "origin": origin,
        "counts": {k: v for k, v in sorted(counts.items()) if _is_square(k)},
        "nonsquare": {k: v for k, v in sorted(counts.items()) if not _is_square(k)},
        **({"regular": {k: len(v) for k, v in sorted(regular.items())}} if regular else {}),
        "num_layers": len(layers),
        "files": files,
        "layers": [
            {
                "layer": l.index,
                "name": l.name,
                "size": l.size_key,
                "channels": len(l.kernels),
                "stride": l.stride,
                "dilation": l.dilation,
            }
            for l in layers
        ],
    }
    atomic.write_json(os.path.join(tmp, "source.json"), entry, sort_keys=True)
    os.chmod(tmp, 0o755)
    return entry


def _is_square(key: str) -> bool:
    kh, kw = key.split("x")
    return kh == kw


def rebuild_manifest(data_dir: str, version: str) -> dict:
    """Rewrites manifest.json from every complete `<slug>/source.json` (sorted by id).

    Under the data directory's lock: two conversions into one directory each rebuild after their
    own source is in place, so the later rebuild lists both. An unreadable source.json is left
    out (converting that source again repairs it), never a reason to fail.
    """
    with locks.exclusive(os.path.join(data_dir, ".lock"), "a manifest rebuild"):
        sources = []
        for name in sorted(os.listdir(data_dir)):
            p = os.path.join(data_dir, name, "source.json")
            if name.startswith(".") or not os.path.isfile(p):
                continue
            try:
                with open(p) as f:
                    entry = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(entry, dict) or not {"id", "counts"} <= entry.keys():
                continue
            entry.pop("layers", None)
            sources.append(entry)
        sources.sort(key=lambda e: e["id"])
        totals: dict[str, int] = {}
        for e in sources:
            for k, n in e["counts"].items():
                totals[k] = totals.get(k, 0) + n
        manifest = {"format": FORMAT, "dwjax_version": version,
                    "totals": dict(sorted(totals.items())), "sources": sources}
        atomic.write_json(os.path.join(data_dir, "manifest.json"), manifest, sort_keys=True)
    return manifest


def has_manifest(data_dir: str) -> bool:
    return os.path.exists(os.path.join(data_dir, "manifest.json"))


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ShardError(
            f"--data_dir {data_dir}: no manifest.json (run `python -m dwjax.convert` first)"
        )
    except ValueError as e:
        raise ShardError(f"{path}: corrupt manifest ({e})")
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


@dataclasses.dataclass
class Shard:
    """One source's kernels of one size, memory-mapped: `kernels` `[n, k, k]`, `meta` `[n]`."""
    source: str
    dir: str
    kernels: np.ndarray
    meta: np.ndarray
    layer_names: dict[int, str]
    sha256: str  # of the kernel file: identifies the content, whatever the directory is called


def iter_shards(data_dir: str, kernel_size: int) -> Iterator[Shard]:
    """Yields every source's k×k shard in manifest order; arrays are read-only memmaps."""
    key = f"{kernel_size}x{kernel_size}"
    for entry in read_manifest(data_dir)["sources"]:
        if key not in entry["counts"]:
            continue
        d = source_dir(data_dir, entry["dir"])
        try:
            with open(os.path.join(d, "source.json")) as f:
                layers = json.load(f)["layers"]
            kernels = np.load(kernel_file(data_dir, entry["dir"], kernel_size), mmap_mode="r")
            meta = np.load(meta_file(data_dir, entry["dir"], kernel_size), mmap_mode="r")
        except (OSError, ValueError, KeyError) as e:
            raise ShardError(
                f"{d}: shard missing or unreadable ({type(e).__name__}); run convert again"
            )
        yield Shard(
            entry["id"],
            entry["dir"],
            kernels,
            meta,
            {l["layer"]: l["name"] for l in layers},
            entry["files"][f"k{key}.npy"]["sha256"],
        )


def release_pages(kernels, start: int, stop: int) -> None:
    """Rows `[start, stop)` of a read-only memory-mapped array (a shard's `kernels`) leave this
    process's resident memory once read: the pages stay in the page cache and a later read maps
    them again. Without it every page a long job reads stays mapped, and the resident set grows
    with the shard although one chunk is in use. A no-op for other arrays, and for writable or
    copy-on-write maps, whose changes the advice could discard."""
    mm = getattr(kernels, "_mmap", None)  # np.memmap keeps its mmap.mmap here
    if (mm is None or getattr(kernels, "mode", None) != "r"
            or not hasattr(mmap, "MADV_DONTNEED") or stop <= start):
        return
    view = np.frombuffer(mm, np.uint8)
    base = view.ctypes.data
    del view  # an exported buffer would keep the mmap from being closed
    lo = kernels[start:start + 1].ctypes.data - base
    hi = lo + (stop - start) * kernels.strides[0]
    page = mmap.PAGESIZE
    lo = -(-lo // page) * page  # whole pages inside the rows only
    hi = hi // page * page
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def take_rows(kernels, index: np.ndarray, block: int = 512) -> np.ndarray:
    """`kernels[index]` for row indices `[n]` (float32 `[n, k, k]`), read in ascending row order
    `block` rows at a time, the pages of each block's span released after it (`release_pages`).

    Why: a page fault on a file cached in large folios maps the whole folio (about 2 MB on this
    workplace's kernel), so a sparse read of a memory-mapped shard maps most of the file;
    reading in order and releasing as it goes keeps that to one block's span.
    """
    index = np.asarray(index, np.int64)
    order = np.argsort(index, kind="stable")
    ordered = index[order]
    out = np.empty((len(index), *kernels.shape[1:]), np.float32)
    for a in range(0, len(index), block):
        part = ordered[a:a + block]
        out[order[a:a + block]] = kernels[part]
        release_pages(kernels, int(part[0]), int(part[-1]) + 1)
    return out


def count_kernels(data_dir: str, kernel_size: int) -> int:
    return int(read_manifest(data_dir)["totals"].get(f"{kernel_size}x{kernel_size}", 0))


def describe(entry: dict) -> str:
    """One line for a source's manifest entry: kernels per size and depthwise layers."""
    if not entry["counts"] and not entry["nonsquare"]:
        return "no depthwise convolutions"
    by_size = sorted(entry["counts"].items(), key=lambda kv: -int(kv[0].split("x")[0]))
    parts = [f"{k}: {n:,}" for k, n in by_size]
    parts += [f"{k} (non-square, kept apart): {n:,}" for k, n in entry["nonsquare"].items()]
    return ", ".join(parts) + f" kernels in {entry['num_layers']} depthwise layers"


def add_sources(data_dir: str, sources: Sequence, log: Callable[[str], None] = print,
                regular_sample: int = 0) -> dict:
    """Converts each source (`dwjax.io.sources.Source`) not already in `data_dir`; returns the
    rebuilt manifest.

    Every source is loaded fully before its directory is written (temp + rename), so an error or a
    kill leaves no partial shard; the manifest is rebuilt from the completed sources each time.
    """
    created = not os.path.exists(data_dir)
    ensure_writable(data_dir)
    atomic.clean_stale(data_dir)
    try:
        for src in sources:
            t0 = time.perf_counter()
            if source_complete(data_dir, src.slug, src.id, src.origin.get("sha256")):
                log(f"{src.id}: already converted, skipped")
                continue
            regular = (src.load_regular(regular_sample)
                       if regular_sample > 0 and src.load_regular is not None else None)
            entry = write_source(data_dir, src.slug, src.id, src.origin, src.load(), regular)
            log(f"{src.id}: {describe(entry)} ({time.perf_counter() - t0:.2f}s)")
    except BaseException:
        atomic.clean_stale(data_dir)
        if created and not os.listdir(data_dir):
            os.rmdir(data_dir)
        elif os.path.isdir(data_dir) and os.listdir(data_dir):
            # sources completed before the failure stay (they are whole); the manifest lists them
            rebuild_manifest(data_dir, __version__)
        raise
    return rebuild_manifest(data_dir, __version__)


def read_source_json(data_dir: str, shard_dir: str) -> dict | None:
    """A source's `source.json` (its manifest entry, origin and layers), or None when it is gone."""
    try:
        with open(os.path.join(source_dir(data_dir, shard_dir), "source.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
