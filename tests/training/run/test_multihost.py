"""A multi-host run as two real processes on this machine (jax.distributed on localhost, gloo collectives).

Two `jlora train` processes of 2 CPU devices each, launched with the documented environment
variables on one RUN_DIR, against the same run in one process: the records hold each step once
(only process 0 writes them) and equal the single process's; every process takes part in the
Orbax saves, and the checkpoint restores the same adapters. The step is one program over a mesh of
all 4 devices: the batch's rows split over them (each process feeding its own), and with mesh.fsdp=4
the base's weights split over both processes too.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jlora
from jlora.cli import main
from jlora.training.records.metrics import read_metrics

from ...conftest import BUCKETS, xla_devices

ARGS = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, embd_pdrop: 0.0, resid_pdrop: 0.0}",
    "seq_len=64",
    BUCKETS,
    "batch_size=8",
    "steps=4",
    "log_every=1",
    "eval_every=2",
    "eval_batches=2",
    "eval.forgetting=null",
    "exact_match=8",
    "checkpoint.every=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("fsdp", "mesh"), [(1, "member 1 x data 4 x fsdp 1"), (4, "member 1 x data 1 x fsdp 4")])
def test_two_processes_record_each_step_once(tmp_path, fsdp, mesh):
    sets = [arg for value in ARGS for arg in ("--set", value)]
    multi_sets = [*sets, "--set", f"mesh.fsdp={fsdp}"]
    env = {
        **os.environ,
        "XLA_FLAGS": xla_devices(2),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
        "JAX_NUM_PROCESSES": "2",
    }
    command = [sys.executable, "-m", "jlora.cli", "train", *multi_sets, "--out", str(tmp_path / "multi")]
    processes = [
        subprocess.Popen(
            command, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in (0, 1)
    ]
    try:
        assert main(["train", *sets, "--out", str(tmp_path / "single")]) == 0  # meanwhile: one process, one device
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert f"devices 4 (mesh {mesh})" in outputs[0][0] and "jlora:" not in outputs[1][0]  # process 1 writes nothing

    multi, single = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
    assert [(r["step"], sorted(r)) for r in multi] == [(r["step"], sorted(r)) for r in single]
    assert [r["step"] for r in multi if "loss" in r] == [1, 2, 3, 4]  # each step once
    for key in ("loss", "grad_norm", "val_loss"):
        np.testing.assert_allclose([r[key] for r in multi if key in r], [r[key] for r in single if key in r], 1e-5)
    assert [r.get("exact_match") for r in multi] == [r.get("exact_match") for r in single]

    (events,) = (tmp_path / "multi" / "tb").iterdir()  # one event file, each step once
    from tensorboardX.proto.event_pb2 import Event

    from jlora.training.records.tensorboard import records

    parsed = [Event.FromString(body) for _, body in records(events.read_bytes())]
    tagged = [(e.step, v.tag) for e in parsed for v in e.summary.value]
    assert len(tagged) == len(set(tagged)) and {s for s, tag in tagged if tag == "loss"} == {1, 2, 3, 4}
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["step"] == 4 and np.isclose(summary["val_loss"], single[-1]["val_loss"], rtol=1e-5)

    steps = sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir())
    assert steps == [2, 4]
    _, _, lora, _, _ = jlora.load_run(tmp_path / "multi")
    _, _, expected, _, _ = jlora.load_run(tmp_path / "single")
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
