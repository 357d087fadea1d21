"""TensorBoard scalars without TensorFlow, PyTorch or tensorboardX: the event file written by hand.

An event file is a sequence of TFRecords, each holding one serialised ``Event`` protobuf::

    record = uint64 len | uint32 masked_crc32c(len) | Event bytes | uint32 masked_crc32c(bytes)
    Event  = wall_time (1: double) | step (2: int64) | file_version (3) or summary (5)
    Summary.Value = tag (1: string) | simple_value (2: float)

Scalars are all jlora logs, so these few fields are the whole format it needs.

>>> hex(crc32c(b"123456789"))  # the standard CRC-32C check value
'0xe3069283'
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecords use."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, **body: bytes) -> bytes:
    head = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
    if "file_version" in body:
        return head + _field(3, body["file_version"])
    return head + _field(5, body["summary"])


def _scalar_summary(values: dict[str, float]) -> bytes:
    return b"".join(
        _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)) for tag, value in values.items()
    )


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


class ScalarWriter:
    """Appends scalar summaries to a new ``events.out.tfevents.*`` file in `log_dir`."""

    def __init__(self, log_dir: str | Path):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        self._file.write(_record(_event(0, file_version=b"brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._file.write(_record(_event(step, summary=_scalar_summary(values))))
            self._file.flush()

    def close(self) -> None:
        self._file.close()
