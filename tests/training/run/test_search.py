"""Successive halving over a population: the rule alone, then one search against its members' solo runs,
the ranking of its logged metrics, an exact resume after SIGKILL (inside a rung and between rungs), the
same search on 4 CPU devices, its report and ``--member best``.

The search: 8 members (r in 1, 4 x alpha in r, 4r x lr in 5e-3, 2e-2; LoRA, embedding and residual
dropout on), rungs at steps 2 and 4 of 6 (8 -> 4 -> 2, the last two ranked at step 6), a checkpoint
every step. It runs once uninterrupted in this process (the reference, through `jlora train`, which
also writes its report); the other runs are compared with it.
"""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jlora.cli import main
from jlora.core.lora.adapter import flatten_adapters
from jlora.errors import CheckpointError
from jlora.training.records.artifacts import load_run
from jlora.training.records.checkpoint import best_member, find_checkpoint, load_adapter
from jlora.training.records.metrics import read_metrics
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
from jlora.training.run.loop import StepInfo
from jlora.training.run.search import Search, SearchConfig, decide, ranking, rung_steps, search_steps
from jlora.training.run.train import train

from ...conftest import BUCKETS, sets, xla_devices

TINY = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",  # embedding and residual dropout on
    BUCKETS,
    "seq_len=64",
    "batch_size=8",
    "steps=6",
    "log_every=1",
    "eval_every=100",  # the rungs evaluate (and the last step)
    "eval_batches=1",
    "exact_match=0",
    "eval.forgetting=null",
    "lora.dropout=0.1",
    "checkpoint.every=1",
    "checkpoint.max_to_keep=null",
]
SEARCH = ["population={grid: {r: [1, 4], alpha: [r, 4r], lr: [5.0e-3, 2.0e-2]}}", "search={eta: 2, rung_every: 2}"]

# Kills `jlora train` (argv) with SIGKILL right after checkpoint N is committed ("save:N": between rungs)
# or right after the rung at step N is decided, before anything records it ("rung:N": inside a rung).
KILL = """
import os, signal, sys
from jlora.training.records import checkpoint
from jlora.training.run import search

what, at = os.environ["JLORA_TEST_KILL"].split(":")
if what == "save":
    save = checkpoint.save
    def save_then_die(manager, step, *args, **kwargs):
        save(manager, step, *args, **kwargs)
        if step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save_then_die
else:
    rung = search.Search.rung
    def decide_then_die(self, step, rows):
        record = rung(self, step, rows)
        if step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return record
    search.Search.rung = decide_then_die
from jlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


# --- the rule alone -----------------------------------------------------------------------------------------------


def test_decide_keeps_the_best_ceil_n_over_eta_ties_by_index():
    values = {0: 3.0, 2: 1.0, 5: 2.0, 7: 1.0, 9: float("nan")}
    assert ranking(values, [0, 2, 5, 7, 9]) == [2, 7, 5, 0, 9]  # 2 and 7 tie: index order; NaN last
    assert decide(values, [0, 2, 5, 7, 9], eta=2) == ([2, 5, 7], [0, 9])  # ceil(5 / 2) = 3
    assert decide(values, [0, 2, 5, 7, 9], eta=3) == ([2, 7], [0, 5, 9])
    assert decide({0: 0.1, 1: 0.3, 2: 0.2}, [0, 1, 2], eta=2, higher_is_better=True) == ([1, 2], [0])  # exact match
    assert decide({4: 1.0}, [4], eta=2) == ([4], [])
    with pytest.raises(ValueError, match=r"no metric for member\(s\) \[1\]"):
        decide({0: 1.0}, [0, 1], eta=2)
    assert rung_steps(100, 400) == [100, 200, 300] and rung_steps(3, 7) == [3, 6] and rung_steps(3, 6) == [3]


def test_search_steps_restages_after_each_rung_and_stops_on_request_there():
    calls = []

    def step_of(label):
        return lambda state, batch, rng: (state + [label], {})

    def restage(state, at):
        calls.append((at, state[-1]))
        return step_of(f"after {at}"), state, None

    infos = list(
        search_steps(step_of("first"), [], lambda i: i, None, start=1, stop=7, rungs=[2, 4, 6], restage=restage)
    )
    assert [(i.step, i.last, i.state[-1]) for i in infos] == [
        (2, False, "first"),
        (3, False, "after 2"),
        (4, False, "after 2"),
        (5, False, "after 4"),
        (6, False, "after 4"),
        (7, True, "after 6"),
    ]
    assert calls == [(2, "first"), (4, "after 2"), (6, "after 4")]
    stopped = list(
        search_steps(step_of("x"), [], lambda i: i, None, start=0, stop=9, rungs=[3, 6], restage=restage,
                     stop_requested=lambda s: s == 3)
    )  # fmt: skip
    assert [(i.step, i.last, i.interrupted) for i in stopped] == [(1, False, False), (2, False, False), (3, True, True)]
    assert isinstance(stopped[0], StepInfo)


def test_a_lone_survivor_skips_the_rungs_left(tmp_path):
    """2 members, eta 2, rungs at 2 and 4 of 6: the rung at 2 leaves one member, whose rung at 4 is skipped."""
    population = "population={grid: {r: [1, 4], alpha: [r], lr: [5.0e-3]}}"
    assert main(["train", *sets(*TINY, population, "search={eta: 2, rung_every: 2}"), "--out", str(tmp_path)]) == 0
    search = json.loads((tmp_path / "summary.json").read_text())["search"]
    (lone,) = search["alive"]
    assert [r["step"] for r in search["rungs"]] == [2] and search["final"]["ranking"] == [lone]
    evaluated = by_member(tmp_path, "val_loss")
    assert sorted(evaluated) == [(0, 0), (0, 1), (2, 0), (2, 1), (6, lone)]  # none at step 4
    assert sorted(m for (s, m) in by_member(tmp_path) if s > 2) == [lone] * 4  # it trained on, alone
    assert search["member_steps"] == 2 * 2 + 4


def test_prunes_at_names_the_rungs_with_more_than_one_member_alive():
    search = Search(SearchConfig(eta=2, rung_every=2), steps=6, n_members=2)
    assert [s for s in range(7) if search.prunes_at(s)] == [2, 4]
    search.alive = [1]
    assert not any(search.prunes_at(s) for s in range(7))


def test_best_member_names_a_finished_search_only():
    assert best_member({"step": 6, "search": {"alive": [3], "best": 3}}) == 3
    with pytest.raises(CheckpointError, match="has not ranked its last members yet .* members alive: \\[1, 3\\]"):
        best_member({"step": 4, "search": {"alive": [1, 3], "best": None}})
    with pytest.raises(CheckpointError, match="the run is not a search"):
        best_member({"step": 4})


# --- one search, against what it must equal -----------------------------------------------------------------------


def cli(*args: str, env: dict | None = None, kill: str | None = None) -> subprocess.Popen:
    command = [sys.executable, *(["-c", KILL] if kill else ["-m", "jlora.cli"]), "train", *args]
    env = {**os.environ, **(env or {}), **({"JLORA_TEST_KILL": kill} if kill else {})}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, status: int = 0) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == status, f"{process.args[-1]}: exit status {process.returncode}\n{err[-3000:]}"
    return out + err


def by_member(run_dir, key: str = "loss") -> dict[tuple[int, int], float]:
    return {(r["step"], r["member"]): r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    args = sets(*TINY, *SEARCH)
    four = cli(*args, "--out", str(root / "four"), env={"XLA_FLAGS": xla_devices(4), "JAX_PLATFORMS": "cpu"})
    killed = cli(*args, "--out", str(root / "killed"), kill="save:2")  # right after rung 2's checkpoint
    assert main(["train", *args, "--out", str(root / "reference")]) == 0  # uninterrupted, with its report
    logs = [finish(killed, -signal.SIGKILL)]
    logs.append(finish(cli(*args, "--out", str(root / "killed"), kill="rung:4"), -signal.SIGKILL))  # in rung 4
    logs.append(finish(cli(*args, "--out", str(root / "killed"))))
    summary = json.loads((root / "reference" / "summary.json").read_text())
    solos = {}
    for k in summary["search"]["rungs"][0]["kept"]:  # every member that survived a rung, alone
        spec = load_adapter(find_checkpoint(root / "reference"), k)[2]["member"]
        alone = [f"lora.r={spec['lora_config']['r']}", f"lora.alpha={spec['lora_config']['alpha']}"]
        alone += [f"optim.lr={spec['lr']}", f"adapter_seed={spec['seed']}"]
        train(load_run_config(DEFAULT_CONFIG, [*TINY, *alone]), root / f"solo{k}", progress=False)
        solos[k] = root / f"solo{k}"
    return {
        "reference": root / "reference",
        "killed": root / "killed",
        "logs": logs,
        "four": root / "four",
        "four_log": finish(four),
        "solos": solos,
        "summary": summary,
    }


def test_survivors_equal_their_solo_runs(runs):
    search = runs["summary"]["search"]
    losses = by_member(runs["reference"])
    final = find_checkpoint(runs["reference"])
    assert len(runs["solos"]) == 4
    for k, solo in runs["solos"].items():
        trained = search["steps_trained"][k]
        assert trained >= 4  # survived the first rung
        alone = {r["step"]: r["loss"] for r in read_metrics(solo) if "loss" in r}
        np.testing.assert_allclose(
            [losses[s, k] for s in range(1, trained + 1)], [alone[s] for s in range(1, trained + 1)], rtol=0, atol=1e-5
        )
        assert not any((s, k) in losses for s in range(trained + 1, 7))  # a pruned member stops at its rung
        lora = flatten_adapters(load_adapter(final, k)[0])  # the search's last checkpoint holds every member
        alone_lora = flatten_adapters(load_adapter(solo / "checkpoints" / str(trained))[0])
        assert lora.keys() == alone_lora.keys()
        for path, adapter in lora.items():
            for name in ("A", "B"):
                assert adapter[name].shape == alone_lora[path][name].shape  # its own rank, padding cut off
                np.testing.assert_allclose(adapter[name], alone_lora[path][name], rtol=0, atol=1e-5)


def test_each_rung_prunes_what_a_ranking_of_the_logged_metrics_gives(runs):
    search = runs["summary"]["search"]
    logged = by_member(runs["reference"], "val_loss")
    alive = list(range(8))
    assert [r["step"] for r in search["rungs"]] == [2, 4] and search["final"]["step"] == 6
    for rung in search["rungs"]:
        values = {m: v for (s, m), v in logged.items() if s == rung["step"]}
        assert sorted(values) == alive  # every live member, and only those, was evaluated at the rung
        ranked = sorted(alive, key=lambda m: (values[m], m))
        n = math.ceil(len(alive) / 2)
        assert rung["kept"] == sorted(ranked[:n]) and rung["pruned"] == sorted(ranked[n:])
        alive = rung["kept"]
    final = {m: v for (s, m), v in logged.items() if s == 6}
    assert sorted(final) == alive and search["best"] == min(alive, key=lambda m: (final[m], m))
    assert search["member_steps"] == 8 * 2 + 4 * 2 + 2 * 2 and search["alive"] == alive
    trained = by_member(runs["reference"])
    assert {m for (s, m) in trained if s == 3} == set(search["rungs"][0]["kept"])  # the step after a rung: survivors


def test_sigkill_inside_a_rung_and_between_rungs_resumes_exactly(runs):
    first, second, third = runs["logs"]
    assert "search: rung at step 2" in first and "resuming" not in first
    assert "resuming at step 2" in second and "4 of 8 members alive" in second
    assert "step 4 [" in second and "rung at step 4" not in second  # evaluated and decided, killed before a word of it
    assert "resuming at step 3" in third and "rung at step 4" in third  # the rung decided again, as before
    for key in ("loss", "val_loss"):
        assert by_member(runs["killed"], key) == by_member(runs["reference"], key)  # bit for bit
    resumed = json.loads((runs["killed"] / "summary.json").read_text())
    assert resumed["search"] == runs["summary"]["search"]
    for k in range(8):
        lora, reference = (
            flatten_adapters(load_adapter(find_checkpoint(d), k)[0]) for d in (runs["killed"], runs["reference"])
        )
        for path in lora:
            np.testing.assert_array_equal(lora[path]["A"], reference[path]["A"])
            np.testing.assert_array_equal(lora[path]["B"], reference[path]["B"])


def test_eight_members_on_four_devices_equal_one_device(runs):
    assert "devices 4" in runs["four_log"]
    four = json.loads((runs["four"] / "summary.json").read_text())["search"]
    one = runs["summary"]["search"]
    assert [(r["kept"], r["pruned"]) for r in four["rungs"]] == [(r["kept"], r["pruned"]) for r in one["rungs"]]
    assert four["best"] == one["best"] and four["final"]["ranking"] == one["final"]["ranking"]
    for key in ("loss", "val_loss"):
        a, b = by_member(runs["four"], key), by_member(runs["reference"], key)
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[x] for x in sorted(a)], [b[x] for x in sorted(a)], rtol=0, atol=1e-5)
    best = one["best"]
    lora, reference = (
        flatten_adapters(load_adapter(find_checkpoint(d), best)[0]) for d in (runs["four"], runs["reference"])
    )
    for path in lora:
        np.testing.assert_allclose(lora[path]["B"], reference[path]["B"], rtol=0, atol=1e-5)


def test_report_and_member_best(runs, tmp_path):
    run = runs["reference"]
    search = runs["summary"]["search"]
    best = search["best"]
    report = json.loads((run / "search" / "leaderboard.json").read_text())
    rows = report["leaderboard"]
    assert [row["place"] for row in rows] == list(range(1, 9)) and rows[0]["member"] == best
    logged = by_member(run, "val_loss")
    for row in rows:
        r, alpha = row["r"], row["alpha"]
        assert row["trainable_params"] == r * (128 + 64 + 160 + 160) + 64  # A and B of the 4 modules, and ln_f
        assert row["effective_lr"] == pytest.approx(row["lr"] * alpha / r) and row["scaling"] == alpha / r
        assert row["preset"] == {1: "conservative", 4: "aggressive"}[alpha / r]
        assert row["steps_trained"] == search["steps_trained"][row["member"]]
        assert {int(s): v for s, v in row["val_loss"].items()} == {
            s: logged[s, row["member"]] for s in (2, 4, 6) if s <= row["steps_trained"]
        }
        assert row["pruned_at"] == (None if row["steps_trained"] == 6 else row["steps_trained"])
    assert [h["claim"][:10] for h in report["heuristics"]] == ["alpha = 2r", "small data", "the effect"]
    assert report["winner"]["member"] == best and len(report["winner"]["modules"]) == 4
    assert (run / "search" / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run / "search" / "leaderboard.md").read_text()
    assert markdown.count("\n| ") >= 8 + 4 and "best r at 1,000 training examples" in markdown
    assert "report" in json.loads((run / "summary.json").read_text())["search"]

    by_name, by_index = (flatten_adapters(load_run(run, member=m)[2]) for m in ("best", best))
    assert all(np.array_equal(by_name[p]["B"], by_index[p]["B"]) for p in by_index)
    assert main(["export", str(run), "--peft", str(tmp_path / "peft"), "--member", "best"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == rows[0]["r"] and config["lora_alpha"] == rows[0]["alpha"]
    assert main(["export", str(runs["solos"][best]), "--peft", str(tmp_path / "no"), "--member", "best"]) == 2
    assert not (tmp_path / "no").exists()
