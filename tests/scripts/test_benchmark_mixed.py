"""scripts/benchmark_mixed.py --quick: both systems write the same answers, and the summary holds every figure."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_mixed.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_mixed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_compares_the_same_answers(tmp_path):
    bench = load_script()
    result = bench.main(["--quick", "--in-process", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(result))
    assert result["setup"]["adapters"] == 2 and result["setup"]["prompts"] == 8 and len(result["rounds"]) == 2
    for name in ("mixed", "separate", "base"):
        figures = result["systems"][name]
        assert figures["tokens_per_s"] > 0 and figures["compile_s"] > 0
        assert np.isclose(figures["tokens_per_s"], 8 * 4 / figures["round_s"])
    ratios = [r["seconds"]["separate"] / r["seconds"]["mixed"] for r in result["rounds"]]
    assert np.isclose(result["speedup"], np.median(ratios))
    ceilings = [r["seconds"]["separate"] / r["seconds"]["base"] for r in result["rounds"]]
    assert np.isclose(result["ceiling"], np.median(ceilings))
    assert set(result["load"]) >= {"quiet", "max_load", "cpu"}
    assert result["same_answers"]  # prompt n answered by adapter n mod K, in one mixed call or in K calls
    assert len({result["systems"][name]["answers_sha256"] for name in ("mixed", "separate")}) == 1
    assert result["systems"]["base"]["answers_sha256"] != result["systems"]["mixed"]["answers_sha256"]  # no adapter
