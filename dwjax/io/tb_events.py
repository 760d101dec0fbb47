"""TensorBoard-readable scalar summaries without tensorflow or tensorboardX.

An event file is a TFRecord stream of `Event` protocol buffers: each record is
`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`. A scalar event
is `Event{wall_time=1: double, step=2: int64, summary=5: Summary{value=1: Value{tag=1: string,
simple_value=2: float}}}`; the first event of a file carries `file_version=3: "brain.Event:2"`.
The few protobuf fields needed are encoded by hand (they never change), so `tensorboard --logdir
<workdir>/tensorboard` shows the training curves with no extra dependency.
"""
from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # CRC-32C (Castagnoli), reflected
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """One serialized `Event` holding one scalar."""
    v = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)
    summary = _bytes_field(1, v)
    return (_field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
            + _bytes_field(5, summary))


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))
    )


class ScalarWriter:
    """Appends scalars to `<logdir>/events.out.tfevents.<time>.<host>` (a new file per writer, as
    TensorBoard expects; a resumed run's new file simply continues the curves)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        self.path = os.path.join(
            logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        )
        self._f = open(self.path, "ab")
        version = _field(1, 1) + struct.pack("<d", now) + _bytes_field(3, b"brain.Event:2")
        self._f.write(_record(version))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._f.write(_record(scalar_event(tag, float(value), int(step), time.time())))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_scalars(path: str) -> list[tuple[str, float, int]]:
    """Parses an event file written by ScalarWriter back into `(tag, value, step)`, checking
    CRCs."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != masked_crc(data[pos:pos + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        body = data[pos + 12:pos + 12 + n]
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        pos += 16 + n
        event = _parse(body)
        if 5 in event:
            value = _parse(_parse(event[5])[1])
            out.append((value[1].decode(), struct.unpack("<f", value[2])[0], event.get(2, 0)))
    return out


def _parse(buf: bytes) -> dict:
    """Minimal protobuf decoder: {field number: last value} (varint → int, fixed → raw bytes)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _read_varint(buf, pos)
        elif wire == 1:
            fields[number], pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            fields[number], pos = buf[pos:pos + 4], pos + 4
        else:
            n, pos = _read_varint(buf, pos)
            fields[number], pos = buf[pos:pos + n], pos + n
    return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos
