"""Every benchmark script runs on the shared harness: each in its smallest mode (--quick), its figures and verdict."""

import json

from .test_harness import load


def test_benchmark_jlora_against_peft(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert load("benchmark").main(["--quick", "--workload", "qa", "--peft", "float32", "--out", str(out)]) == 0
    (qa,) = json.loads(out.read_text())
    assert set(qa) >= {"jlora", "peft", "ratios", "rounds", "load", "peft_padding"}
    assert qa["ratios"]["peft"] > 0 and len(qa["rounds"]) == 1 and set(qa["rounds"][0]["seconds"]) == {"jlora", "peft"}
    assert qa["jlora"]["shapes"] >= 1 and 0 < qa["jlora"]["padding"] < 1 and qa["peft"]["dtype"] == "float32"
    assert qa["load"]["verdict"] in capsys.readouterr().out


def test_benchmark_variants(capsys):
    assert load("benchmark_variants").main(["--quick", "--no-peft"]) == 0
    out = capsys.readouterr().out
    assert "DoRA / LoRA" in out and "round 0: jlora:lora" in out
    assert "a result: every round's load below" in out or "NOT a result: the load reached" in out


def test_benchmark_population():
    result = load("benchmark_population").main(["--quick"])
    assert len(result["end_to_end"]["solo_s"]) == 2 and len(result["compile"]["solo_s"]) == 2
    assert result["per_step"]["ratio"] > 0 and len(result["per_step"]["load"]["loads"]) == 1
