"""The command as a new user meets it: packaged configs by name, from a plain install, and a Hub
model asked for offline answered at once."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jlora.cli import build_parser, main
from jlora.training.run.config import CONFIGS, load_run_config, packaged_configs

from ..conftest import TINY_QA, sets, unused_port

REPO = Path(__file__).resolve().parents[2]


def test_packaged_configs_by_name_and_in_help(tmp_path, monkeypatch, capsys):
    assert packaged_configs() == ["default", "e2e_gpt2m", "gpt2_qa", "smollm2_qa"]
    for name in packaged_configs():  # the repository's configs/ is the package's, through links
        assert (REPO / "configs" / f"{name}.yaml").resolve() == (CONFIGS / f"{name}.yaml").resolve()
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert load_run_config("gpt2_qa") == load_run_config(CONFIGS / "gpt2_qa.yaml")
    assert load_run_config("gpt2_qa").model.name == "gpt2"
    smollm2 = load_run_config("smollm2_qa")  # the real model, asked in its chat template
    assert (smollm2.model.name, smollm2.data.template, smollm2.data.tokenizer) == ("smollm2", "chat", None)
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "the name of one shipped with jlora: default, e2e_gpt2m, gpt2_qa, smollm2_qa" in " ".join(train_help.split())
    assert "they run from a clone of the repository" in " ".join(build_parser().format_help().split())
    assert main(["train", "gpt2_qb", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    configs = "default, e2e_gpt2m, gpt2_qa, smollm2_qa"
    assert err == f"jlora train: error: no such config file gpt2_qb; packaged configs, by name: {configs}\n"


def test_evaluation_shows_its_own_progress(default_run_and_log):
    """Each evaluation of the tiny default run counts 5 batches: 2 for the loss (eval_batches=2), 1 for exact
    match, 2 for forgetting on the bundled generic text (eval_batches=2)."""
    _, stderr = default_run_and_log
    bars = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("evaluating:")]
    assert bars and all(line.split("|")[2].split()[0].endswith("/5") for line in bars)
    assert sum(" 0/5 " in line for line in bars) == 2  # at step 0 and at step 3


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_model_offline_fails_at_once_in_one_line(offline, tmp_path):
    """Unreachable (a refused port standing for the Hub) or switched off: one line naming the model, exit 2."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{unused_port()}"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "jlora.cli", "train", "gpt2_qa", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    reason = "switched off (HF_HUB_OFFLINE=1)" if offline else "unreachable (Connect"
    assert done.stderr.startswith(f"jlora train: error: cannot get 'gpt2': the Hugging Face Hub is {reason}")
    assert "pass a local folder in its place" in done.stderr and "--set model=/path/to/gpt2" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # no retry warnings
    assert not (tmp_path / "run").exists()


def test_a_plain_install_trains_a_packaged_config_by_name(tiny_hf_with_tokenizer, tmp_path):
    """A real non-editable build of jlora alone (its package data included): its `jlora` script trains
    `gpt2_qa` (by name, on the bundled data) from another directory, on the environment's dependencies."""
    source, target, work = tmp_path / "source", tmp_path / "site", tmp_path / "work"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "jlora", source / "jlora", ignore=shutil.ignore_patterns("__pycache__"))
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*install, str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert {"default.yaml", "gpt2_qa.yaml"} <= {p.name for p in (target / "jlora" / "configs").iterdir()}
    work.mkdir()

    # the installed `jlora` script, run as its shebang would, after saying where jlora comes from
    script = target / "bin" / "jlora"
    run_script = "import jlora, runpy, sys; print(jlora.__file__); sys.argv = sys.argv[1:]; "
    run_script += "runpy.run_path(sys.argv[0], run_name='__main__')"
    qa = sets(f"model={tiny_hf_with_tokenizer}", *TINY_QA)  # the programs test_export compiled: cached
    done = subprocess.run(
        [sys.executable, "-c", run_script, str(script), "train", "gpt2_qa", *qa, "--out", "qa_run"],
        cwd=work, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == str(target / "jlora" / "__init__.py")
    assert f"jlora: {tiny_hf_with_tokenizer} | LoRA r=8 alpha=16" in done.stdout  # gpt2_qa's adapter
    assert (work / "qa_run" / "checkpoints" / "2").is_dir()
