"""`jlora evaluate RUN_DIR --data FILE` on a tiny run of the packaged e2e_gpt2m recipe, trained on an E2E-shaped
file written here: each MR decoded once, as `generate` decodes it alone, and scored as `nlg_metrics.score` scores it."""

from __future__ import annotations

import json

import pytest

from jlora.cli import main
from jlora.core.decoding.generate import generate
from jlora.research.nlg_metrics import score
from jlora.training.data.data2text import clean_text
from jlora.training.data.prompt import run_prompt
from jlora.training.data.sources import read_references
from jlora.training.data.tokenizer import ByteTokenizer
from jlora.training.records.artifacts import load_run

from ..conftest import sets

AROMI = "name : Aromi | food : Chinese | area : riverside"
VAULTS = "name : The Vaults | food : English | area : city centre"
BLUE = "name : Blue | food : Italian | area : riverside"
TRAIN = [
    f"{AROMI}||Aromi serves Chinese food by the riverside .",
    f"{VAULTS}||The Vaults serves English food in the city centre .",
    f"{BLUE}||Blue is an Italian place by the riverside .",
    f"{AROMI}||By the riverside , Aromi has Chinese food .",
]
TEST = [  # three MRs, Aromi's three references not adjacent
    f"{AROMI}||Aromi is a Chinese place by the riverside .",
    f"{AROMI}||Aromi serves Chinese food .",
    f"{VAULTS}||The Vaults is in the city centre .",
    f"{AROMI}||By the riverside , Aromi serves Chinese food .",
    f"{BLUE}||Blue serves Italian food .",
]
# e2e_gpt2m on a tiny random GPT-2 over byte tokens (prompts under 64 bytes, rows under 120), 3 steps
TINY_E2E = [
    "model=random",
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 128}",
    "data.tokenizer=bytes",
    "data.buckets=64",
    "seq_len=128",
    "steps=3",
    "optim.warmup_steps=0",
    "optim.lr=0.05",
    "eval_every=3",
    "eval_batches=1",
    "checkpoint.every=3",
]
DECODING = ["--num-beams", "3", "--max-new-tokens", "24"]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """(run directory, test file) of `jlora train e2e_gpt2m` shrunk to seconds."""
    folder = tmp_path_factory.mktemp("e2e")
    train, test = write(folder / "train.txt", TRAIN * 4), write(folder / "test.txt", TEST)
    run = folder / "run"
    overrides = sets(*TINY_E2E, f"data.train={train}", f"data.validation={train}")
    assert main(["train", "e2e_gpt2m", *overrides, "--out", str(run)]) == 0
    return run, test


def test_each_mr_is_decoded_once_as_alone_and_scored(e2e_run, tmp_path, capsys):
    run, test = e2e_run
    capsys.readouterr()
    assert (
        main(["evaluate", str(run), "--data", str(test), *DECODING, "--batch-size", "2", "--out", str(tmp_path)]) == 0
    )
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    contexts, references = read_references(test)
    assert [r["context"] for r in records] == contexts == [AROMI, VAULTS, BLUE]
    assert [r["references"] for r in records] == references and len(references[0]) == 3

    # each MR alone: the run's prompt form (e, MR, "<|endoftext|>"), the paper's search, cut and cleaned
    model, params, lora, _, _ = load_run(run)
    tokenizer = ByteTokenizer()
    for record in records:
        ids = run_prompt(record["context"], "e2e", tokenizer)[1]
        alone = generate(model, params, [ids], lora=lora, max_new_tokens=24, eos_token_id=256, num_beams=3,
                         length_penalty=0.8, no_repeat_ngram_size=4)  # fmt: skip
        assert record["output"] == clean_text(tokenizer.decode(alone.sequences()[0]))

    summary = json.loads((tmp_path / "summary.json").read_text())
    outputs = [r["output"] for r in records]
    assert summary["scores"] == score(outputs, references)
    assert summary["mrs"] == summary["mrs_in_file"] == 3
    assert summary["decoding"] == dict(max_new_tokens=24, num_beams=3, length_penalty=0.8, no_repeat_ngram_size=4,
                                       batch_size=2)  # fmt: skip
    assert (tmp_path / "e2e_pred.txt").read_text() == "".join(" ".join(o.split()) + "\n" for o in outputs)
    assert (tmp_path / "e2e_ref.txt").read_text().split("\n\n")[:3] == ["\n".join(rs) for rs in references]
    assert out.startswith("BLEU ") and "CIDEr " in out and len(out.splitlines()) == 1
    assert "decoding: 100%" in err and "2/2" in err  # the progress bar over batches (3 MRs, 2 a batch)


def test_a_limit_scores_the_first_mrs_and_says_cider_is_the_subsets(e2e_run, tmp_path, capsys):
    run, test = e2e_run
    capsys.readouterr()
    argv = ["evaluate", str(run), "--data", str(test), *DECODING, "--limit", "2", "--metrics", "bleu,cider"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "note: CIDEr over 2 of 3 MRs is not the full set's CIDEr" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mrs"] == 2 and summary["mrs_in_file"] == 3 and list(summary["scores"]) == ["bleu", "cider"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-beams", "0"], "--num-beams must be an integer >= 1, got 0"),
        (["--length-penalty", "inf"], "--length-penalty must be a finite number, got inf"),
        (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be an integer >= 0, got -1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
        (["--metrics", "bleu,sari"], "--metrics: expected some of bleu,nist,meteor,rouge_l,cider, got 'bleu,sari'"),
        (
            ["--max-new-tokens", "100"],
            "the longest prompt (69 tokens) + --max-new-tokens 100 exceeds the model's 128 "
            "positions (at most 59 new tokens fit)",
        ),  # fmt: skip
        (
            ["--num-beams", "129", "--max-new-tokens", "8"],
            "--num-beams 129: beam search keeps 2 x num_beams candidates of the model's 257 tokens",
        ),
    ],
)
def test_bad_options_are_one_line_and_status_2(e2e_run, flags, message, capsys):
    run, test = e2e_run
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(test), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jlora evaluate: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_what_is_missing_is_said_before_decoding(e2e_run, default_run, tmp_path, monkeypatch, capsys):
    run, test = e2e_run

    def error(*argv) -> str:
        capsys.readouterr()
        assert main(["evaluate", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        return err

    assert "--data: no such file" in error(str(run), "--data", str(tmp_path / "none.txt"))
    assert "is not a run directory" in error(str(tmp_path), "--data", str(test))
    assert "was trained on 'qa' records; jlora evaluate decodes data-to-text runs" in error(
        str(default_run), "--data", str(test)
    )
    monkeypatch.setattr("jlora.cli.evaluate.shutil.which", lambda name: None)  # no Java on PATH
    assert "METEOR, ROUGE-L and CIDEr need Java on PATH" in error(str(run), "--data", str(test))
    assert "pass --metrics bleu,nist" in error(str(run), "--data", str(test), "--metrics", "bleu,rouge_l")
    monkeypatch.setitem(__import__("sys").modules, "jlora.research.nlg_metrics", None)  # the nlg extra missing
    assert "the nlg extra (sacrebleu, pycocoevalcap) is not installed: pip install 'jlora[nlg]'" in error(
        str(run), "--data", str(test)
    )
