"""Every benchmark script runs on the shared harness, each in its smallest mode (--quick).

scripts/benchmark.py and scripts/benchmark_population.py run in the GPU check's dry run
(tests/scripts/test_device_check.py), which reads their figures; the others run here.
"""

import json

import pytest

from .test_harness import load


def test_benchmark_variants(capsys):
    assert load("benchmark_variants").main(["--quick", "--no-peft"]) == 0
    out = capsys.readouterr().out
    assert "DoRA / LoRA" in out and "round 0: jlora:lora" in out
    assert "a result: every round's load below" in out or "NOT a result: the load reached" in out


def test_benchmark_search_quick(tmp_path):
    """scripts/benchmark_search.py --quick: the three strategies from scratch, their figures and the same schedule."""
    s = load("benchmark_search").main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()).keys() == s.keys()
    (round_,) = s["rounds"]
    search, grid, asha = round_["search"], round_["grid"], round_["asha"]
    assert (search["processes"], grid["processes"], asha["processes"]) == (1, 2, 3)  # asha: 2 trials to rung 1, 1 on
    assert grid["member_steps"] == 2 * 2 and search["member_steps"] == asha["member_steps"] == 2 + 1
    assert search["rungs"] == asha["rungs"] and round_["asha_same_winner"]  # the same rule on the same losses
    assert grid["best"] == min(range(2), key=lambda k: grid["val_loss"][k])
    assert all(x["wall_s"] > 0 and x["compile_s"] >= 0 for x in (search, grid, asha))
    assert s["grid_over_search"] == pytest.approx(grid["wall_s"] / search["wall_s"])
    assert s["verdict"].startswith(("a result", "NOT a result"))


def test_benchmark_on_a_llama_folder(tmp_path, capsys):
    """scripts/benchmark.py --model on a tiny Llama checkpoint: both systems load its weights, LoRA on q, k, v."""
    from ..conftest import make_llama_checkpoint

    make_llama_checkpoint(tmp_path / "llama", "llama")
    args = ["--model", str(tmp_path / "llama"), "--workload", "uniform", "--rounds", "1", "--batch", "2"]
    assert load("benchmark").main([*args, "--uniform-seq", "8", "--peft", "float32", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "(Llama family) L=2 D=32 H=4 V=101 | LoRA r=8 alpha=16 on q_proj,k_proj,v_proj" in out
    (result,) = json.loads((tmp_path / "r").read_text())
    assert result["jlora"]["step_s"] > 0 and result["peft"]["step_s"] > 0 and "peft" in result["ratios"]
