"""metrics.jsonl and the hand-written TensorBoard event file, read back with tensorboardX's protobufs."""

import struct

import pytest

from jlora.training.records.metrics import MetricsWriter, read_metrics
from jlora.training.records.tensorboard import crc32c


def read_records(path):
    """TFRecords of an event file, checking both masked CRCs the way TensorFlow's reader does."""
    from tensorboardX.crc32c import crc32c as reference_crc  # an independent implementation

    def masked(crc):
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, records = path.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == masked(reference_crc(data[:8]))
        body = data[12 : 12 + length]
        assert struct.unpack("<I", data[12 + length : 16 + length])[0] == masked(reference_crc(body))
        records.append(body)
        data = data[16 + length :]
    return records


def test_crc32c_matches_tensorboardx():
    from tensorboardX.crc32c import crc32c as reference_crc

    for data in (b"", b"a", b"123456789", bytes(range(256)) * 3):
        assert crc32c(data) == reference_crc(data)


def test_rows_reach_jsonl_and_tensorboard(tmp_path):
    from tensorboardX.proto.event_pb2 import Event

    writer = MetricsWriter(tmp_path)
    writer.write({"step": 0, "val_loss": 5.5})
    writer.write({"step": 1, "loss": 2.25, "lr": 1e-3, "note": "text is skipped"})
    writer.close()
    assert read_metrics(tmp_path) == [
        {"step": 0, "val_loss": 5.5},
        {"step": 1, "loss": 2.25, "lr": 1e-3, "note": "text is skipped"},
    ]
    (events_file,) = (tmp_path / "tb").iterdir()
    events = [Event.FromString(r) for r in read_records(events_file)]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert scalars == [(0, "val_loss", 5.5), (1, "loss", 2.25), (1, "lr", pytest.approx(1e-3))]


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(6):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    MetricsWriter(tmp_path, truncate_after=3).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    MetricsWriter(tmp_path, truncate_after=0).close()  # a fresh run in the same folder
    assert read_metrics(tmp_path) == []


def test_a_resumed_run_reads_as_one_run_in_tensorboard(tmp_path):
    """Resuming reopens the run's event file cut after the resumed step (a half-written record too)."""
    from tensorboardX.proto.event_pb2 import Event

    writer = MetricsWriter(tmp_path)
    for step in range(7):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    (events_file,) = (tmp_path / "tb").iterdir()
    with events_file.open("ab") as f:  # a record a killed process left half-written
        f.write(struct.pack("<Q", 40) + b"\x00" * 9)
    writer = MetricsWriter(tmp_path, truncate_after=3)
    for step in range(4, 9):
        writer.write({"step": step, "loss": 10.0 + step})
    writer.close()
    assert list((tmp_path / "tb").iterdir()) == [events_file]
    events = [Event.FromString(r) for r in read_records(events_file)]
    assert [e.file_version for e in events if e.file_version] == ["brain.Event:2"]
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert scalars == [(s, "loss", float(s)) for s in range(4)] + [(s, "loss", 10.0 + s) for s in range(4, 9)]
    assert [r["loss"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 14, 15, 16, 17, 18]

    MetricsWriter(tmp_path, truncate_after=0).close()  # a fresh start in the same folder
    assert [Event.FromString(r).file_version for r in read_records(events_file)] == ["brain.Event:2"]


def test_a_process_other_than_the_first_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, truncate_after=0, primary=False)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []
