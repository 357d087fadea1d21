"""TensorBoard scalars without TensorFlow, PyTorch or tensorboardX: the event file written by hand.

An event file is a sequence of TFRecords, each holding one serialised ``Event`` protobuf::

    record = uint64 len | uint32 masked_crc32c(len) | Event bytes | uint32 masked_crc32c(bytes)
    Event  = wall_time (1: double) | step (2: int64) | file_version (3) or summary (5)
    Summary.Value = tag (1: string) | simple_value (2: float)

Scalars are all jlora logs, so these few fields are the whole format it needs.

A run keeps one event file. A resumed run reopens it and cuts it after the last record at or
before the step it resumes from (and before any record a killed process left half-written),
then appends: like metrics.jsonl, the file reads as one run with each step once, which every
TensorBoard reader shows as such (a second file per resume would repeat the replayed steps).

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


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def records(data: bytes) -> list[tuple[int, bytes]]:
    """(end offset, Event bytes) of each whole, intact record; stops at a torn or corrupt one."""
    out, pos = [], 0
    while pos + 12 <= len(data):
        head = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", head)
        end = pos + 12 + length + 4
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != _masked(crc32c(head)) or end > len(data):
            break
        body = data[pos + 12 : end - 4]
        if struct.unpack("<I", data[end - 4 : end])[0] != _masked(crc32c(body)):
            break
        out.append((end, body))
        pos = end
    return out


def event_step(event: bytes) -> int:
    """The ``step`` field (2) of a serialised Event (0 when absent, as in protobuf)."""
    pos = 0
    while pos < len(event):
        key, pos = _read_varint(event, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(event, pos)
            if number == 2:
                return value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # length-delimited
            size, pos = _read_varint(event, pos)
            pos += size
    return 0


def _cut_after(path: Path, step: int) -> None:
    """Truncate an event file after its last intact record whose step is <= `step` (0: after the header)."""
    kept = 0
    for i, (end, body) in enumerate(records(path.read_bytes())):
        if i > 0 and (step == 0 or event_step(body) > step):
            break
        kept = end
    with path.open("r+b") as f:
        f.truncate(kept)


class ScalarWriter:
    """Appends scalar summaries to the run's ``events.out.tfevents.*`` file in `log_dir`.

    `truncate_after` None starts a new file; a step number reopens the newest one, cut after
    that step (0: only its header kept), as a resumed run needs.
    """

    def __init__(self, log_dir: str | Path, *, truncate_after: int | None = None):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
        if truncate_after is not None and existing:
            self.path = existing[-1]
            _cut_after(self.path, truncate_after)
            if self.path.stat().st_size:
                self._file = self.path.open("ab")
                return
        else:
            self.path = log_dir / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        self._file.write(_record(_event(0, file_version=b"brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._file.write(_record(_event(step, summary=_scalar_summary(values))))
            self._file.flush()

    def close(self) -> None:
        self._file.close()
