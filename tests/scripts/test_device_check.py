"""scripts/device_check.sh --dry-run: every section of the GPU check runs on a CPU, and its JSON has every field."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

SPEED_FIELDS = {
    "jlora_step_s",
    "peft_bf16_step_s",
    "jlora_vs_peft_bf16",
    "jlora_useful_gflops",
    "jlora_mfu",
    "peft_mfu",
    "jlora_device_peak_bytes",
    "peft_device_peak_bytes",
    "jlora_compile_s",
    "load",
}


def test_the_gpu_check_dry_run_fills_every_field(tmp_path):
    done = subprocess.run(
        [str(SCRIPTS / "device_check.sh"), "--dry-run"],
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},  # this interpreter, not PATH's
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    errors = {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    assert report["env"]["dry_run"] is True and report["env"]["backend"] == "cpu" and report["env"]["jax"]
    correctness = report["correctness"]
    bf16 = correctness["bf16_vs_f32"]
    assert len(bf16["losses"]["float32"]) == len(bf16["losses"]["bfloat16"]) == 3 and bf16["ok"]
    assert correctness["cudnn_vs_xla_attention"]["skipped"].startswith("no GPU")
    assert correctness["gpu_tests"]["skipped"] == 3 and correctness["gpu_tests"]["failed"] == 0
    assert set(report["speed"]) == {"qa", "uniform", "seq1024"}
    for name, figures in report["speed"].items():
        assert SPEED_FIELDS <= set(figures), name
        assert figures["jlora_step_s"] > 0 and figures["jlora_vs_peft_bf16"] > 0 and figures["jlora_mfu"] is None
        assert "a result" in figures["load"]  # the benchmark's verdict on the load ("a result" / "NOT a result")
    (qa,) = json.loads((tmp_path / "benchmark_qa.json").read_text())  # scripts/benchmark.py's own JSON
    assert set(qa) >= {"jlora", "peft-bf16", "ratios", "rounds", "load", "peft_padding"}
    assert len(qa["rounds"]) == 1 and set(qa["rounds"][0]["seconds"]) == {"jlora", "peft-bf16"}
    assert (
        qa["jlora"]["shapes"] >= 1
        and 0 < qa["jlora"]["padding"] < 1
        and qa["peft-bf16"]["dtype"] == "bfloat16 autocast"
    )
    population = report["population"]  # scripts/benchmark_population.py --quick
    assert population["members"] == 2 and population["per_step_ratio"] > 0 and population["compile_solo_s"] > 0
    llama = report["llama"]  # SmolLM2's shapes, tiny here: the Llama benchmark against PEFT and a short fine-tune
    assert llama["shape"]["model_type"] == "llama" and llama["jlora_step_s"] > 0 and llama["jlora_vs_peft_bf16"] > 0
    assert llama["train_tokens_per_s"] > 0 and llama["last_loss"] > 0
    e2e = report["e2e"]  # the E2E recipe short: trained, decoded by beam search twice alike, scored
    assert e2e["ok"] and e2e["train_tokens_per_s"] > 0 and e2e["last_loss"] > 0
    assert e2e["decode"]["num_beams"] == 4 and e2e["decode"]["rows"] == 6 and e2e["decode"]["compile_s"] > 0
    assert set(e2e["scores"]) >= {"bleu", "nist"} and len(e2e["outputs"]) == 2
    assert set(report["aims"]) == {"mfu_seq1024_at_least_45pct", "qa_at_least_3x_peft", "population_at_least_4x_solo"}
    assert report["aims"]["mfu_seq1024_at_least_45pct"] is None  # no bf16 peak for a CPU
