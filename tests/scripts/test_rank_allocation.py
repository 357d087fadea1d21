"""scripts/rank_allocation.py --quick: every method trained and scored at the budget, each allocation's ranks."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rank_allocation.py"
# the quick model: 2 layers, 32 wide; c_attn (32 -> 96), c_proj (32 -> 32), c_fc (32 -> 128), mlp.c_proj (128 -> 32)
COSTS = {"attn.c_attn": 32 + 96, "attn.c_proj": 32 + 32, "mlp.c_fc": 32 + 128, "mlp.c_proj": 128 + 32}


def test_quick_comparison(tmp_path):
    spec = importlib.util.spec_from_file_location("rank_allocation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    returned = module.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary.keys() == returned.keys()
    png = (tmp_path / "rank_allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    methods = summary["methods"]
    assert list(methods) == ["uniform", "rslora", "eva", "adalora", "lora_ga", "pissa", "energy"]
    paths = [f"h.{i}.{m}" for i in range(2) for m in COSTS]
    budget = 8 * sum(COSTS.values()) * 2
    assert summary["budget_params"] == budget
    for name, row in methods.items():
        assert list(row["ranks"]) == paths, name
        assert np.isfinite(row["val_loss"]) and 0 <= row["exact_match"] <= 1 and row["seconds"] > 0, name
    for name in ("uniform", "rslora", "lora_ga", "pissa"):
        assert set(methods[name]["ranks"].values()) == {8} and methods[name]["lora_params"] == budget
    assert methods["uniform"]["seconds"] == methods["rslora"]["seconds"]  # one population run
    assert methods["uniform"]["val_loss"] != methods["rslora"]["val_loss"]
    assert methods["lora_ga"]["init"] == "lora_ga" and methods["eva"]["init"] == "eva"
    assert sum(methods["eva"]["ranks"].values()) == 8 * len(paths)  # EVA moves ranks, keeps their sum
    assert len(set(methods["eva"]["ranks"].values())) > 1
    adalora = methods["adalora"]
    assert set(adalora["trained_ranks"].values()) == {12}  # 1.5 x the budget, pruned to it
    assert sum(adalora["ranks"].values()) <= 8 * len(paths)
    energy = methods["energy"]
    spent = sum(r * COSTS[p.split(".", 2)[2]] for p, r in energy["ranks"].items())
    assert spent == energy["lora_params"] <= budget and len(set(energy["ranks"].values())) > 1
    assert energy["probe_ranks"] == energy["ranks"]
