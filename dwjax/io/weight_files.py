"""Lazy, torch-free readers for published weight files (PyTorch and safetensors checkpoints).

`open_checkpoint(path)` returns `{name: LazyTensor}` for a `.safetensors`, a zip-format
`.pth/.pt/.bin`
(torch >= 1.6) or a legacy-format `.pth` (torch < 1.6). Nothing is read until `LazyTensor.load()` is
called, and then only that tensor's bytes, through `np.memmap`: a multi-GB checkpoint yields its few
depthwise kernels in about a second and with little memory, and no torch install is needed (the
Colab TPU user converts without it).

Why not `torch.load(mmap=True)`: it still needs torch, still unpickles every tensor object, and
cannot read the legacy format lazily. The pickle is read with a restricted unpickler that builds
only dicts, lists and tensor stubs, never arbitrary callables (like `weights_only=True`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Any

import numpy as np

from dwjax.errors import CheckpointError  # noqa: F401  (raised here; importers catch it from here)

# torch storage class name -> numpy dtype. bfloat16 is read as uint16 and widened on load.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": "bfloat16", "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


@dataclasses.dataclass
class LazyTensor:
    """A tensor inside a checkpoint file: shape known, bytes read only by `load()`.

    `file_offset` is the byte offset of element 0 of the tensor's storage; `storage_offset` and
    `stride` are in elements, as torch stores them.
    """
    path: str
    dtype: Any
    shape: tuple[int, ...]
    file_offset: int
    storage_numel: int
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None

    def load(self) -> np.ndarray:
        """Reads this tensor only; returns a C-contiguous array (bfloat16 widened to float32)."""
        dt = _np_dtype(self.dtype)
        try:
            storage = np.memmap(self.path, dtype=dt, mode="r", offset=self.file_offset,
                                shape=(self.storage_numel,))
        except (ValueError, OSError) as e:  # offset/size beyond the end of file
            raise CheckpointError(
                f"{self.path}: truncated or corrupt (tensor data out of range: {e})"
            )
        shape = tuple(self.shape)
        if self.stride is None:
            n = int(np.prod(shape, dtype=np.int64))
            flat = storage[self.storage_offset:self.storage_offset + n]
            if flat.size != n:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt (tensor shorter than its shape)"
                )
            arr = np.array(flat).reshape(shape)
        else:
            need = self.storage_offset + sum((s - 1) * st for s, st in zip(shape, self.stride)) + 1
            if min(shape, default=1) > 0 and need > self.storage_numel:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt (tensor beyond its storage)"
                )
            view = np.lib.stride_tricks.as_strided(
                storage[self.storage_offset:], shape=shape,
                strides=tuple(s * dt.itemsize for s in self.stride))
            arr = np.array(view, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if self.dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


# ----------------------------------------------------------------------------- safetensors
def _read_safetensors(path: str) -> dict[str, LazyTensor]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        f.seek(0, 2)
        size = f.tell()
        if n > size - 8:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header length {n})"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})")
    base = 8 + n
    out = {}
    # safetensors stores tensors sorted by dtype and name, not in network order: "blocks.10" would
    # come before "blocks.2". Natural order (numeric parts as numbers) restores the order of
    # nn.Sequential indices, so a .safetensors yields its layers in the order a .pth or the model
    # walk does.
    for name in sorted((k for k in header if k != "__metadata__"), key=_natural_key):
        info = header[name]
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            continue
        begin, end = info["data_offsets"]
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensor {name} ends past the file)"
            )
        numel = (end - begin) // _np_dtype(dtype).itemsize
        out[name] = LazyTensor(path, dtype, tuple(info["shape"]), base + begin, numel)
    return out


def _natural_key(name: str) -> list:
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))]


# ----------------------------------------------------------------------------- torch pickles
class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES.get(name)


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: Any
    numel: int
    file_offset: int = -1  # filled in once the data section is located


class _Stub:
    """Stands in for any class the checkpoint references (a pickled nn.Module, a TorchScript
    module, optimizer state, argparse namespaces, numpy scalars...). Accepts any construction,
    keeps its state (a module's parameters are in it) and never runs code from the file."""

    origin = ""  # "module.Class" of what it stands in for (set on per-class subclasses)

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Stub()


@functools.lru_cache(maxsize=None)
def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"origin": f"{module}.{name}"})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage) or storage.dtype is None:
        return _Stub()
    return (storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        return _stub_class(module, name)

    def persistent_load(self, saved_id):
        typename = saved_id[0]
        typename = typename.decode("ascii") if isinstance(typename, bytes) else typename
        if typename != "storage":
            return _Stub()
        storage_type, key, _location, numel = saved_id[1:5]
        if self._legacy and len(saved_id) > 5 and saved_id[5] is not None:
            raise CheckpointError("legacy storage views are not supported")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, dtype, int(numel))
        return self._storages[key]


def _select_weights(obj: Any) -> Any:
    """Training checkpoints wrap the weights (`{'state_dict': ..., 'optimizer': ...}`); the
    optimizer
    moments have the kernels' shapes too, so take only the weights."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module", "net"):
            value = obj.get(key)
            if isinstance(value, dict) or (isinstance(value, _Stub) and _module_items(value)):
                return value
    return obj


def _module_items(stub: _Stub) -> dict | None:
    """A pickled module's `{name: parameter, buffer or submodule}` in state_dict order, or None.

    `torch.save(model)` pickles each nn.Module with its `__dict__` (`_parameters`, `_buffers`,
    `_modules`); a TorchScript archive pickles each module with its attributes directly.
    """
    state = stub.state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if not isinstance(state, dict):
        return None
    if "_modules" in state and "_parameters" in state:
        out = {}
        for key in ("_parameters", "_buffers", "_modules"):
            if isinstance(state.get(key), dict):
                out.update(state[key])
        return out
    if stub.origin.startswith("__torch__."):
        return state
    return None


def _to_lazy(path: str, obj: Any, out: dict[str, LazyTensor], prefix: str = "") -> None:
    """Flattens nested dicts (and pickled modules) of rebuilt tensors into
    `{dotted.name: LazyTensor}`."""
    if isinstance(obj, _Stub):
        obj = _module_items(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                _to_lazy(path, v, out, f"{prefix}{k}.")
    elif isinstance(obj, tuple) and len(obj) == 4 and isinstance(obj[0], _Storage):
        storage, offset, size, stride = obj
        out[prefix[:-1]] = LazyTensor(path, storage.dtype, size, storage.file_offset, storage.numel,
                                      offset, stride)


def _read_torch_zip(path: str) -> dict[str, LazyTensor]:
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{path}: zip file without data.pkl, not a torch checkpoint")
        root = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with zf.open(pkl) as f:
            obj = _RestrictedUnpickler(f, storages, legacy=False).load()
        with open(path, "rb") as raw:
            for key, st in storages.items():
                info = zf.getinfo(f"{root}data/{key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: compressed tensor data, cannot memory-map")
                raw.seek(info.header_offset)
                local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path}: corrupt zip entry for tensor storage {key}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                st.file_offset = info.header_offset + 30 + name_len + extra_len
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, struct.error) as e:
        raise CheckpointError(
            f"{path}: truncated or corrupt torch zip checkpoint ({type(e).__name__}: {e})"
        )
    out: dict[str, LazyTensor] = {}
    _to_lazy(path, _select_weights(obj), out)
    return out


def _read_torch_legacy(path: str) -> dict[str, LazyTensor]:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            if pickle.load(f) != _LEGACY_MAGIC:
                raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
            pickle.load(f)  # protocol version
            pickle.load(f)  # sys info
            obj = _RestrictedUnpickler(f, storages, legacy=True).load()
            keys = pickle.load(f)
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{path}: truncated or corrupt torch checkpoint ({type(e).__name__}: {e})"
            )
        offset = f.tell()
        f.seek(0, 2)
        size = f.tell()
    # Storages follow in `keys` order, each as an int64 element count then the raw elements.
    for key in keys:
        st = storages[str(key)]
        st.file_offset = offset + 8
        offset += 8 + st.numel * (_np_dtype(st.dtype).itemsize if st.dtype is not None else 0)
        if st.dtype is None:
            raise CheckpointError(f"{path}: storage {key} of unknown type")
    if offset > size:
        raise CheckpointError(f"{path}: truncated torch checkpoint ({size} bytes, needs {offset})")
    out: dict[str, LazyTensor] = {}
    _to_lazy(path, _select_weights(obj), out)
    return out


def _safetensors_head(path: str, magic: bytes) -> bool:
    """A safetensors file by content: an 8-byte header length inside the file, then `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    return len(head) == 9 and struct.unpack("<Q", magic)[0] < size - 8 and head[8:9] == b"{"


def open_checkpoint(path: str) -> dict[str, LazyTensor]:
    """Maps every tensor of a checkpoint file to a LazyTensor, in the file's (network) order
    (safetensors, which keeps no order, in natural name order).

    Nested containers (`{'state_dict': {...}}`, `{'model': {...}}`) are flattened with dotted names.
    Raises CheckpointError (one line, naming the file) for missing, truncated or corrupt files.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file")
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if len(magic) < 8:
        raise CheckpointError(f"{path}: empty or truncated checkpoint file")
    try:
        if path.endswith(".safetensors") or _safetensors_head(path, magic):
            return _read_safetensors(path)
        if magic[:4] == b"PK\x03\x04":
            return _read_torch_zip(path)
        if magic[:1] == b"\x80":
            return _read_torch_legacy(path)
    except CheckpointError:
        raise
    except (
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        OverflowError,
        MemoryError,
        RecursionError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        struct.error,
    ) as e:
        # corrupt headers/pickles fail in many ways (a missing key, a bad utf-8 name, a huge frame)
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})"
        ) from None
    raise CheckpointError(
        f"{path}: unknown checkpoint format (not safetensors, torch zip or torch legacy)"
    )
