"""metrics.jsonl and the TensorBoard event files tensorboardX writes, read back with an independent reader."""

import struct

import pytest

from jlora.training.records.metrics import MetricsWriter, read_metrics


def read_records(path):
    """TFRecords of an event file, checking both masked CRCs the way TensorFlow's reader does."""
    from tensorboardX.crc32c import crc32c as reference_crc

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


def read_events(tb_dir):
    """Every Event of every event file in `tb_dir`, files in name order (as TensorBoard reads a folder)."""
    from tensorboardX.proto.event_pb2 import Event

    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    return [Event.FromString(r) for f in files for r in read_records(f)], files


def scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_rows_reach_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 0, "val_loss": 5.5})
    writer.write({"step": 1, "loss": 2.25, "lr": 1e-3, "note": "text is skipped"})
    assert scalars(read_events(tmp_path / "tb")[0])[-1][:2] == (1, "lr")  # on disk before close: a kill loses none
    writer.close()
    assert read_metrics(tmp_path) == [
        {"step": 0, "val_loss": 5.5},
        {"step": 1, "loss": 2.25, "lr": 1e-3, "note": "text is skipped"},
    ]
    events, files = read_events(tmp_path / "tb")
    assert len(files) == 1 and events[0].file_version == "brain.Event:2"
    assert scalars(events) == [(0, "val_loss", 5.5), (1, "loss", 2.25), (1, "lr", pytest.approx(1e-3))]


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
    """Resuming cuts the run's event files after the resumed step (a half-written record too), then
    tensorboardX writes a new file after them: each step once, in order."""
    writer = MetricsWriter(tmp_path)
    for step in range(7):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    (first,) = (tmp_path / "tb").iterdir()
    with first.open("ab") as f:  # a record a killed process left half-written
        f.write(struct.pack("<Q", 40) + b"\x00" * 9)
    for resumed, losses in ((3, range(4, 9)), (5, range(6, 8))):  # resumed twice, within the same second
        writer = MetricsWriter(tmp_path, truncate_after=resumed)
        for step in losses:
            writer.write({"step": step, "loss": 10.0 * resumed + step})
        writer.close()
    events, files = read_events(tmp_path / "tb")
    assert len(files) == 3 and files[0] == first
    assert [e.file_version for e in events if e.file_version] == ["brain.Event:2"] * 3
    expected = [float(s) for s in range(4)] + [30.0 + s for s in (4, 5)] + [50.0 + s for s in (6, 7)]
    assert scalars(events) == [(s, "loss", loss) for s, loss in enumerate(expected)]
    assert [r["loss"] for r in read_metrics(tmp_path)] == expected

    MetricsWriter(tmp_path, truncate_after=0).close()  # a fresh start in the same folder
    events, files = read_events(tmp_path / "tb")
    assert len(files) == 4 and scalars(events) == [] and len(events) == 4  # the four files' headers


def test_without_tensorboardx_the_run_writes_metrics_alone(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a)
    )
    writer = MetricsWriter(tmp_path)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}] and not (tmp_path / "tb").exists()
    assert "tensorboardX is not installed" in capsys.readouterr().err


def test_a_process_other_than_the_first_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, truncate_after=0, primary=False)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []
