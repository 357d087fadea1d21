"""TensorBoard scalars through tensorboardX (no TensorFlow needed), a resumed run cut back to its step.

    writer = ScalarWriter(log_dir)                      # a new event file, written by tensorboardX
    writer.scalars(step, {"loss": 2.31, "lr": 2e-4})    # on disk at once: a killed run loses nothing it logged
    ScalarWriter(log_dir, truncate_after=400)           # resuming at step 400

A resumed run first cuts every event file in `log_dir` after its last record at or before the step
it resumes from (and before any record a killed process left half-written), then writes a new file
after them: read in order, as TensorBoard reads a folder, the files hold each step once, like
metrics.jsonl. ``truncate_after=0`` is a fresh start in a used folder: only the files' headers stay.

An event file is a sequence of TFRecords (``uint64 len | masked crc32c(len) | Event | masked crc32c``);
reading one back to find where to cut needs only that framing and tensorboardX's own ``Event`` protobuf.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path


def records(data: bytes) -> list[tuple[int, bytes]]:
    """(end offset, Event bytes) of each whole, intact record of an event file; stops at a torn or corrupt one."""
    from tensorboardX.record_writer import masked_crc32c

    out, pos = [], 0
    while pos + 12 <= len(data):
        head = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", head)
        end = pos + 12 + length + 4
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc32c(head) or end > len(data):
            break
        body = data[pos + 12 : end - 4]
        if struct.unpack("<I", data[end - 4 : end])[0] != masked_crc32c(body):
            break
        out.append((end, body))
        pos = end
    return out


def event_files(log_dir: str | Path) -> list[Path]:
    """The event files of `log_dir` in the order they were written (the order TensorBoard reads them in)."""
    return sorted(Path(log_dir).glob("events.out.tfevents.*"))


def cut_after(path: Path, step: int) -> None:
    """Truncate an event file after its last intact record whose step is <= `step` (0: after its header)."""
    from tensorboardX.proto.event_pb2 import Event

    kept = 0
    for i, (end, body) in enumerate(records(path.read_bytes())):
        if i > 0 and (step == 0 or Event.FromString(body).step > step):
            break
        kept = end
    with path.open("r+b") as f:
        f.truncate(kept)


class ScalarWriter:
    """Scalars of a run (or of one population member) into a new event file in `log_dir`.

    tensorboardX builds the summaries and writes the records (its `EventsWriter`, synchronously:
    its `SummaryWriter` queues events for a background thread, which a killed run would lose).
    `truncate_after` None leaves the folder's earlier files as they are; a step cuts them after it
    first (a resumed run). The new file's name sorts after them: tensorboardX names a file by the
    second it was opened, and a counter suffix orders two opened within the same second.
    """

    def __init__(self, log_dir: str | Path, *, truncate_after: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter

        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        existing = event_files(log_dir)
        if truncate_after is not None:
            for path in existing:
                cut_after(path, truncate_after)
        self._writer = EventsWriter(str(log_dir / "events"), filename_suffix=f".{len(existing):04d}")
        self._writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One event at `step` holding every value (tag: its key), on disk when this returns."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        if values:
            summary = Summary(value=[v for tag, x in values.items() for v in scalar(tag, x).value])
            self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()
