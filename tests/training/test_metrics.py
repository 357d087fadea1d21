"""metrics.jsonl and the hand-written TensorBoard event file, read back with tensorboardX's protobufs."""

import struct

import pytest

from jlora.training.metrics import MetricsWriter, read_metrics
from jlora.training.tensorboard import crc32c


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
