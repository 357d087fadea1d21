"""scripts/e2e.py --quick: the E2E recipe end to end offline (tiny data and model, a few steps, beams, scores)."""

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_the_quick_recipe_trains_decodes_and_scores(tmp_path):
    spec = importlib.util.spec_from_file_location("e2e", SCRIPTS / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    summary = e2e.main(["--quick", "--out", str(tmp_path)])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["scores"]) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert all(value >= 0 for value in summary["scores"].values()) and summary["train_loss"] > 0
    assert summary["mrs"] == 6 and summary["decoding"]["num_beams"] == 4
    assert summary["decoding"]["length_penalty"] == 0.8 and summary["decoding"]["no_repeat_ngram_size"] == 4

    records = [json.loads(line) for line in (tmp_path / "evaluate" / "outputs.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["references"]) == 3 for r in records)
    train = (tmp_path / "data" / "train.txt").read_text().splitlines()
    assert len(train) == 64 and not {r["context"] for r in records} & {line.split("||")[0] for line in train}

    config = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the recipe's settings, the model shrunk
    assert config["lora"]["r"] == 4 and config["lora"]["alpha"] == 32 and config["lora"]["dropout"] == 0.1
    assert config["lora"]["target_modules"] == ["c_attn.q", "c_attn.v"]
    assert config["optim"]["label_smoothing"] == 0.1 and config["optim"]["weight_decay"] == 0.01
    assert config["model"]["name"] == "random" and config["steps"] == 40
    assert (tmp_path / "checkpoints" / "40").is_dir()
