"""The research scripts' --quick runs: each summary.json's structure, shapes and ranges, and the
criteria that could fail: the rank-k student's update spans the planted one, the rank a planted
task needs is its k, nested random subspaces learn more as they grow, and a small training set
seen many times is overfitted more than a large one.

Each script (and mode) runs once per session, in this process (their `main(argv)`), so they share
JAX's warm caches; the checks then read only what the script wrote under --out.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, out: Path, *extra: str) -> dict:
    module = script(name)
    returned = module.main(["--quick", "--out", str(out), *extra])
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() == returned.keys()
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    return summary


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cache = {}

    def get(name: str, *extra: str) -> dict:
        if (name, extra) not in cache:
            cache[name, extra] = run_quick(name, tmp_path_factory.mktemp(name), *extra)
        return cache[name, extra]

    return get


def in_unit(x: float) -> bool:
    return -1e-6 <= x <= 1 + 1e-6


# The quick model: 1 layer, 32 wide; LoRA on c_attn (32->96), c_proj (32->32), c_fc (32->128),
# mlp.c_proj (128->32), plus ln_f (64 leaves) trained beside it.
LORA_PER_RANK = (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)  # r * (d_in + d_out), summed: 512
LN_F = 2 * 32


def test_planted_rank(quick):
    s = quick("planted_rank")
    assert (s["k"], s["ranks"], s["targets"]) == (4, [2, 4, 8], ["c_attn"])
    assert s["base_gap"] > 0
    assert [st["r"] for st in s["students"]] == [2, 4, 8]
    for st in s["students"]:
        assert st["alpha"] == 2 * st["r"]
        assert st["gap"] >= -1e-6 * s["base_gap"] and math.isclose(st["relative_gap"], st["gap"] / s["base_gap"])
        assert list(st["modules"]) == ["h.0.attn.c_attn"]
        for name in ("phi_row", "phi_column", "phi_A", "energy_top_k"):
            assert in_unit(st[name]) and st[name] == pytest.approx(st["modules"]["h.0.attn.c_attn"][name])
        assert np.isfinite(st["final_loss"])
    # a student of rank 2 < k holds at most rank 2: all its energy is in its top k
    assert s["students"][0]["energy_top_k"] == pytest.approx(1.0)
    # the criterion: the rank-k student's update spans the planted one, on both sides of dW
    assert s["rank_k"]["phi_row"] >= 0.9, s["rank_k"]
    assert s["rank_k"]["phi_column"] >= 0.9, s["rank_k"]


def test_rank_sweep(quick):
    s = quick("rank_sweep")
    assert s["ranks"] == [1, 8, 32] and s["fixed_alpha"] == 16
    assert list(s["series"]) == ["alpha = 2r", "alpha = 16"]
    for name, rows in s["series"].items():
        assert [row["r"] for row in rows] == [1, 8, 32]
        for row in rows:
            r = row["r"]
            assert row["alpha"] == (2 * r if name == "alpha = 2r" else 16)
            assert row["scaling"] == pytest.approx(row["alpha"] / r)
            assert row["effective_lr"] == pytest.approx(s["lr"] * row["alpha"] / r)
            assert row["lora_params"] == r * LORA_PER_RANK and row["trainable_params"] == r * LORA_PER_RANK + LN_F
            assert 0 < row["val_loss"] < s["base_val_loss"] + 1 and np.isfinite(row["train_loss"])
            assert list(row["energy_top"]) == [str(k) for k in (1, 2, 4, 8) if k <= r]
            energy = list(row["energy_top"].values())
            assert all(in_unit(e) for e in energy) and energy == sorted(energy)
            assert 1 - 1e-6 <= row["effective_rank"] <= r + 1e-6
    assert s["series"]["alpha = 2r"][1] == s["series"]["alpha = 16"][1]  # r=8, alpha=16: one run, in both
    assert s["val_loss_spread"]["alpha = 2r"] == pytest.approx(
        np.ptp([r["val_loss"] for r in s["series"]["alpha = 2r"]])
    )


def test_alpha_sweep(quick):
    s = quick("alpha_sweep")
    assert s["r"] == 8
    lr0 = 1e-2  # the quick config's
    settings = [(run["alpha"], run["lr"]) for run in s["runs"]]
    assert settings == [(8, pytest.approx(2 * lr0)), (16, pytest.approx(lr0)), (16, pytest.approx(2 * lr0))]
    for run in s["runs"]:
        assert run["effective_lr"] == pytest.approx(run["lr"] * run["alpha"] / 8)
        assert len(run["losses"]) == s["steps"] and np.all(np.isfinite(run["losses"])) and np.isfinite(run["val_loss"])
    assert [p["equal_product"] for p in s["pairs"]] == [True, False, False]
    assert all(p["curve_distance"] >= 0 and p["val_loss_distance"] >= 0 for p in s["pairs"])
    assert s["summary"]["equal_product"]["pairs"] == 1 and s["summary"]["unequal_product"]["pairs"] == 2
    equal, unequal = (s["summary"][k]["mean_curve_distance"] for k in ("equal_product", "unequal_product"))
    assert s["unequal_over_equal"] == pytest.approx(unequal / equal)


def test_full_vs_lora(quick):
    s = quick("full_vs_lora")
    assert s["ranks"] == [1, 2, 4, 8, 16, 32]
    assert s["shapes"] == {
        "h.0.attn.c_attn": [96, 32],
        "h.0.attn.c_proj": [32, 32],
        "h.0.mlp.c_fc": [128, 32],
        "h.0.mlp.c_proj": [32, 128],
    }
    # every kernel and bias of the four weights, and ln_f; against LoRA r=8 on them and ln_f
    assert s["full"]["trainable_params"] == sum(o * i + o for o, i in s["shapes"].values()) + LN_F
    assert s["lora"]["trainable_params"] == 8 * LORA_PER_RANK + LN_F
    for curve in s["energy"].values():
        values = [curve[str(r)] for r in s["ranks"]]
        assert all(in_unit(v) for v in values) and values == sorted(values)
        assert values[-1] == pytest.approx(1.0)  # r = 32 = min(d_out, d_in): the whole update
    rows = s["truncated"]
    assert [row["r"] for row in rows] == s["ranks"]
    assert all(np.isfinite(row["val_loss"]) and in_unit(row["mean_energy"]) for row in rows)
    assert all(row["min_energy"] <= row["mean_energy"] + 1e-12 for row in rows)
    # cut at full rank, the truncation is the full fine-tune itself
    assert rows[-1]["val_loss"] == pytest.approx(s["full"]["val_loss"], abs=1e-4)
    assert {run: sorted(counts) for run, counts in s["intruders"].items()} == {
        run: sorted(s["shapes"]) for run in ("full", "lora")
    }
    assert all(0 <= n <= 10 for counts in s["intruders"].values() for n in counts.values())
    # learning against forgetting: the full fine-tune and LoRA at r = 1, 8 (one population), on the generic text
    lf = s["learn_forget"]
    assert lf["text"] == "bundled" and lf["pretrain_steps"] == 0
    assert [run["r"] for run in lf["lora"]] == [1, 8] and [run["alpha"] for run in lf["lora"]] == [2, 16]
    lora8 = lf["lora"][1]
    assert lora8["val_loss"] == s["lora"]["val_loss"] and lora8["trainable_params"] == s["lora"]["trainable_params"]
    assert lf["lora"][0]["trainable_params"] == LORA_PER_RANK + LN_F
    for row in (lf["full"], *lf["lora"]):
        assert row["forget_base_loss"] == pytest.approx(lf["base_forget_loss"])
        assert row["forgetting"] == pytest.approx(row["forget_loss"] - row["forget_base_loss"])
        assert row["forget_kl"] > 0 and np.isfinite(row["val_loss"])


def test_intrinsic_dimension(quick):
    s = quick("intrinsic_dimension", "--set", "steps=150")  # the quick run, shorter
    assert s["mode"] == "task" and s["lrs"] == [1e-2] and not s["said"] and not s["whole_model"]  # the config's
    # the subspace spans what the LoRA run trains: the four kernels LoRA adapts and ln_f
    assert s["space"]["leaves"] == [
        f"h.0.{m}.kernel" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ] + [
        "ln_f.bias",
        "ln_f.scale",
    ]
    assert s["space"]["size"] == 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + LN_F == s["full"]["trainable_params"]
    base, full = s["base_val_loss"], s["full"]["val_loss"]
    assert full < base
    rows = s["subspaces"]
    assert [row["d"] for row in rows] == [8, 64, 512] and all(row["lr"] == 1e-2 for row in rows)
    losses = [row["val_loss"] for row in rows]
    # member d reads P's first d columns: nested subspaces, each learning more than the last
    assert base > losses[0] > losses[1] > losses[2], (base, losses, full)
    for row in (*rows, *s["lora"]):
        assert row["recovered"] == pytest.approx((base - row["val_loss"]) / (base - full))
    assert s["d90"] == next((row["d"] for row in rows if row["recovered"] >= 0.9), None)
    assert [(row["r"], row["alpha"]) for row in s["lora"]] == [(1, 2), (8, 16)]
    assert [row["trainable_params"] for row in s["lora"]] == [LORA_PER_RANK + LN_F, 8 * LORA_PER_RANK + LN_F]
    assert s["lora_r90"] == next((row["r"] for row in s["lora"] if row["recovered"] >= 0.9), None)


def test_intrinsic_dimension_planted(quick):
    s = quick("intrinsic_dimension", "--planted", "4", "--steps", "200")
    assert s["mode"] == "planted" and s["targets"] == ["c_attn"] and s["space"]["size"] == 32 * 96
    assert s["dims"] == [64, 128, 256] and s["ranks"] == [1, 4]
    assert [t["k"] for t in s["tasks"]] == [4]
    for t in s["tasks"]:
        k = t["k"]
        assert t["rank_k_dimension"] == k * (32 + 96 - k)  # rank-k 96 x 32 matrices: a manifold of this dimension
        assert 0 < t["full"]["gap"] < 0.5 * t["base_gap"]
        gaps = [row["relative_gap"] for row in t["subspaces"]]
        assert gaps == sorted(gaps, reverse=True) and gaps[0] < 1, gaps  # larger subspaces get closer
        assert [row["params"] for row in t["lora"]] == [r * (32 + 96) for r in s["ranks"]]
        # the criterion: the planted rank is the rank needed
        assert t["r90"] == k, [row["relative_gap"] for row in t["lora"]]
        assert t["lora_params_at_r90"] == k * (32 + 96)
        closed = [row["d"] for row in t["subspaces"] if row["relative_gap"] <= 0.1]
        assert t["d90"] == min(closed, default=None)
        for row in t["subspaces"]:
            assert row["recovered"] == pytest.approx((t["base_gap"] - row["gap"]) / (t["base_gap"] - t["full"]["gap"]))


def test_data_size_sweep(quick):
    s = quick("data_size_sweep", "--set", "steps=150")
    assert s["sizes"] == [64, 512] and s["ranks"] == [1, 8] and s["fixed_alpha"] == 16 and s["data"] == "config"
    assert [b["rows"] for b in s["by_size"]] == [64, 512]
    for b in s["by_size"]:
        assert b["epochs"] == pytest.approx(s["steps"] * s["batch_size"] / b["rows"])
        assert list(b["series"]) == ["alpha = 2r", "alpha = 16"]
        for name, rows in b["series"].items():
            assert [row["r"] for row in rows] == [1, 8]
            assert [row["alpha"] for row in rows] == ([2, 16] if name == "alpha = 2r" else [16, 16])
            for row in rows:
                assert row["gap"] == pytest.approx(row["val_loss"] - row["train_loss"])
                assert row["trainable_params"] == row["r"] * LORA_PER_RANK + LN_F
            assert b["best_r"][name] == min(rows, key=lambda row: row["val_loss"])["r"]
    small, large = ({row["r"]: row for row in b["series"]["alpha = 2r"]} for b in s["by_size"])
    # 64 rows seen ~75 times each are learnt by heart, the more so at r = 8; 512 rows are not
    assert small[8]["gap"] > small[1]["gap"] and small[8]["gap"] > large[8]["gap"] + 0.1, (small, large)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("intrinsic_dimension", ["--dims", "16,x"], "--dims: '16,x' is not a comma-separated list of positive ints"),
        ("intrinsic_dimension", ["--planted", "0,4"], "--planted: '0,4' is not"),
        ("intrinsic_dimension", ["--lr=-1e-3"], "--lr: '-1e-3' is not a comma-separated list of positive, finite"),
        ("data_size_sweep", ["--sizes", "100,"], "--sizes: '100,' is not"),
        ("data_size_sweep", ["--ranks", "two"], "--ranks: 'two' is not"),
    ],
)
def test_bad_arguments_are_one_line_errors(name, args, message, tmp_path, capsys):
    from jlora.cli import exit_status

    out = tmp_path / "out"
    module = script(name)
    assert exit_status(f"{name}.py", lambda: module.main(["--quick", "--out", str(out), *args])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{name}.py: error: {message}") and "\n" not in err, err
    assert not out.exists()  # nothing written
