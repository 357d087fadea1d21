"""Every benchmark script runs on the shared harness, each in its smallest mode (--quick).

scripts/benchmark.py and scripts/benchmark_population.py run in the GPU check's dry run
(tests/scripts/test_device_check.py), which reads their figures; the others run here.
"""

from .test_harness import load


def test_benchmark_variants(capsys):
    assert load("benchmark_variants").main(["--quick", "--no-peft"]) == 0
    out = capsys.readouterr().out
    assert "DoRA / LoRA" in out and "round 0: jlora:lora" in out
    assert "a result: every round's load below" in out or "NOT a result: the load reached" in out
