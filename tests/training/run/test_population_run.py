"""`jlora train` with a population: exact resume after SIGKILL, a member against its solo run, one
metrics stream per member, telemetry against dense float64 numpy, forgetting, padding, export, diagnose.

One population run (4 members differing in rank, alpha, rsLoRA, seed, learning rate and LoRA+)
is killed after its first checkpoint and resumed; a reference runs uninterrupted without
telemetry; one member's settings also run alone. The checks read what these wrote.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jlora.cli import main
from jlora.core.lora.adapter import flatten_adapters, output_columns, split_slice
from jlora.exchange.peft import load_peft
from jlora.training.records.artifacts import load_run
from jlora.training.records.checkpoint import find_checkpoint, load_adapter, lora_config_of
from jlora.training.records.metrics import read_metrics
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
from jlora.training.run.train import train
from jlora.tree import get_path

from ...conftest import BUCKETS

TINY = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",  # with embedding and residual dropout
    BUCKETS,
    "seq_len=64",
    "batch_size=8",
    "steps=12",
    "log_every=1",
    "eval_every=6",
    "eval_batches=2",
    "exact_match=8",
    "lora.dropout=0.1",
    "eval.forgetting=bundled",
    "checkpoint.every=4",
    "checkpoint.max_to_keep=null",
]
MEMBERS = (
    "population={members: [{r: 1, alpha: 2r, seed: 1}, {r: 4, alpha: 16, lr: 1e-2},"
    " {r: 2, rslora: true, seed: 2, lr: 5e-3}, {r: 4, alpha: 8, seed: 3, loraplus_ratio: 4}]}"
)
RANKS = [1, 4, 2, 4]
SOLO_2 = ["lora.r=2", "lora.rslora=true", "adapter_seed=2", "optim.lr=5e-3"]  # member 2 alone


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def cli(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "jlora.cli", "train", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def member_losses(run_dir, member: int | None) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r and r.get("member") == member}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("population")
    killed = cli(*sets(*TINY, MEMBERS, "telemetry=4"), "--out", str(root / "killed"))
    first = root / "killed" / "checkpoints" / "4" / "meta"
    while not first.exists() and killed.poll() is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "training finished before it could be killed"
    train(load_run_config(DEFAULT_CONFIG, [*TINY, MEMBERS]), root / "reference", progress=False)  # no telemetry
    resumed = cli(*sets(*TINY, MEMBERS, "telemetry=4"), "--out", str(root / "killed"))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    train(load_run_config(DEFAULT_CONFIG, [*TINY, *SOLO_2]), root / "solo", progress=False)
    return {"killed": root / "killed", "reference": root / "reference", "solo": root / "solo", "log": out + err}


def test_resume_after_sigkill_is_exact_and_telemetry_changes_no_loss(runs):
    assert "resuming at step 4" in runs["log"] and "population of 4 adapters" in runs["log"]
    for k in range(4):
        resumed, expected = member_losses(runs["killed"], k), member_losses(runs["reference"], k)
        assert sorted(resumed) == list(range(1, 13))
        assert resumed == expected, k  # bit for bit, every step; the reference logged no telemetry


def test_a_member_is_its_solo_run(runs):
    member, solo = member_losses(runs["reference"], 2), member_losses(runs["solo"], None)
    np.testing.assert_allclose([member[s] for s in range(1, 13)], [solo[s] for s in range(1, 13)], rtol=0, atol=1e-5)
    evals = lambda d, m: [r for r in read_metrics(d) if "val_loss" in r and r.get("member") == m]  # noqa: E731
    for a, b in zip(evals(runs["reference"], 2), evals(runs["solo"], None), strict=True):
        for name in ("val_loss", "forget_loss", "forget_kl"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-9), name
        assert a["exact_match"] == b["exact_match"]
    lora, _, meta = load_adapter(find_checkpoint(runs["reference"]), 2)
    solo_lora, _, solo_meta = load_adapter(find_checkpoint(runs["solo"]))
    assert lora_config_of(meta) == lora_config_of(solo_meta) and meta["member"]["seed"] == 2
    for path, adapter in flatten_adapters(lora).items():
        for name in ("A", "B"):
            np.testing.assert_allclose(adapter[name], flatten_adapters(solo_lora)[path][name], rtol=0, atol=1e-5)


def test_one_stream_per_member(runs):
    rows = read_metrics(runs["killed"])
    for step in range(1, 13):
        assert sorted(r["member"] for r in rows if r["step"] == step and "loss" in r) == [0, 1, 2, 3]
    assert sorted(p.name for p in (runs["killed"] / "tb").iterdir()) == [
        "0-r=1,alpha=2,seed=1",
        "1-r=4,alpha=16,lr=0.01",
        "2-r=2,rslora=True,seed=2,lr=0.005",
        "3-r=4,alpha=8,seed=3,loraplus_ratio=4",
    ]
    summary = json.loads((runs["killed"] / "summary.json").read_text())
    assert [m["member"] for m in summary["members"]] == [0, 1, 2, 3] and summary["step"] == 12
    assert all("val_loss" in m and "loss" in m for m in summary["members"])


def test_forgetting_is_reported_beside_the_base(runs):
    evals = [r for r in read_metrics(runs["killed"]) if "forget_loss" in r]
    assert sorted({r["step"] for r in evals}) == [0, 6, 12] and len(evals) == 12
    base = evals[0]["forget_base_loss"]
    assert all(r["forget_base_loss"] == pytest.approx(base, rel=1e-6) for r in evals)
    assert all(r["forget_kl"] == 0 and r["forget_loss"] == pytest.approx(base) for r in evals if r["step"] == 0)
    assert all(r["forget_kl"] > 0 for r in evals if r["step"] == 12)


def dense_figures(adapter, previous, scaling, w):
    dw = scaling * np.asarray(adapter["B"], np.float64) @ np.asarray(adapter["A"], np.float64)
    before = scaling * np.asarray(previous["B"], np.float64) @ np.asarray(previous["A"], np.float64)
    u, s, vt = np.linalg.svd(dw)
    _, _, vt0 = np.linalg.svd(before)
    r = adapter["A"].shape[0]
    s = s[:r]
    p = s / s.sum()
    phi = lambda i: np.sum((vt[:i] @ vt0[:i].T) ** 2) / i  # noqa: E731
    return {
        "singular_values": s,
        "energy_top1": s[0] ** 2 / np.sum(s**2),
        "effective_rank": np.exp(-np.sum(p * np.log(p))),
        "norm": np.linalg.norm(dw),
        "relative_norm": np.linalg.norm(dw) / np.linalg.norm(w),
        "phi_top": phi(1),
        "phi_full": phi(r),
    }


def test_telemetry_equals_dense_float64_numpy(runs):
    rows = [r for r in read_metrics(runs["killed"]) if "effective_rank/mean" in r]
    assert sorted({r["step"] for r in rows}) == [4, 8, 12] and len(rows) == 12
    params = load_run(runs["killed"], 8, member=0)[1]  # the base (no member trains a kernel)
    for k, rank in enumerate(RANKS):
        row = next(r for r in rows if r["step"] == 8 and r["member"] == k)
        now, _, meta = load_adapter(runs["killed"] / "checkpoints" / "8", k)
        before = flatten_adapters(load_adapter(runs["killed"] / "checkpoints" / "4", k)[0])
        cfg = lora_config_of(meta)
        for path, adapter in flatten_adapters(now).items():
            kernel = np.asarray(get_path(params, split_slice(path)[0])["kernel"], np.float64)
            w = kernel[:, output_columns(path, kernel.shape[1])]
            expected = dense_figures(adapter, before[path], cfg.scaling_for(path), w)
            assert len(row[f"singular_values/{path}"]) == rank
            np.testing.assert_allclose(row[f"singular_values/{path}"], expected.pop("singular_values"), rtol=1e-5)
            for name, value in expected.items():
                assert row[f"{name}/{path}"] == pytest.approx(value, rel=1e-5), (k, path, name)
    assert all("phi_top/mean" not in r for r in rows if r["step"] == 4)  # nothing to compare with at step 0


def test_padding_stays_zero_and_a_member_exports_at_its_rank(runs, tmp_path):
    tree = ocp.StandardCheckpointer().restore(find_checkpoint(runs["killed"]) / "adapter")  # stacked, padded
    for path, adapter in flatten_adapters(tree["lora"]).items():
        for k, r in enumerate(RANKS):
            assert np.all(adapter["A"][k, r:] == 0) and np.all(adapter["B"][k, :, r:] == 0), (k, path)
            assert np.abs(adapter["B"][k, :, :r]).max() > 0
    assert main(["export", str(runs["killed"]), "--peft", str(tmp_path / "peft"), "--member", "0"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 2
    peft_cfg, lora, _ = load_peft(tmp_path / "peft")
    expected = flatten_adapters(load_adapter(find_checkpoint(runs["killed"]), 0)[0])
    assert peft_cfg.r == 1 and flatten_adapters(lora).keys() == expected.keys()
    for path, adapter in flatten_adapters(lora).items():
        assert adapter["A"].shape[0] == adapter["B"].shape[1] == 1
        for name in ("A", "B"):
            np.testing.assert_array_equal(adapter[name], expected[path][name])


def test_diagnose_a_member_plots_its_telemetry(runs, tmp_path, capsys):
    assert main(["diagnose", str(runs["killed"]), "--out", str(tmp_path)]) == 2
    assert "choose one with --member K" in capsys.readouterr().err
    assert main(["diagnose", str(runs["killed"]), "--member", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnose.json").read_text())
    assert [s for s, _ in report["telemetry"]["effective_rank"]["h.0.attn.c_attn"]] == [4, 8, 12]
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("population", "message"),
    [
        ("{members: [{r: 2}], grid: {r: [1]}}", "give either members"),
        ("{members: [{rank: 2}]}", "unknown key(s) ['rank']"),
        ("{grid: {r: [1, 2], alpha: [2x]}}", "alpha must be a number or a multiple of r like 2r, got '2x'"),
        ("{grid: {r: [0]}}", "r must be a positive integer, got 0"),
        ("{grid: {lr: [-1]}}", "lr must be a finite number > 0, got -1"),
        ("{grid: {lr: [.inf]}}", "lr must be a finite number > 0, got inf"),
    ],
)
def test_bad_population_is_one_line_and_exit_2(population, message, tmp_path, capsys):
    assert main(["train", "--set", f"population={population}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    ("variant", "message"),
    [("lora.use_dora=true", "lora.use_dora is not available"), ("lora.init=pissa", "lora.init=pissa is not available")],
)
def test_variants_that_change_the_base_are_refused_in_a_population(variant, message, tmp_path, capsys):
    population = "population={grid: {r: [1, 2]}}"
    assert main(["train", "--set", population, "--set", variant, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "checkpoints")
