"""`jlora combine`: PEFT folders and a population's members in, a PEFT folder out that real PEFT loads."""

import jax
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

import jlora
from jlora.cli import main
from jlora.core.algebra.combine import combine_adapters, combine_leaves
from jlora.exchange.peft import load_peft, save_peft
from jlora.training.records.checkpoint import find_checkpoint, load_adapter, load_base
from jlora.tree import overlay

IDS = np.array([[5, 17, 3, 88, 42, 9, 61, 2], [70, 1, 33, 33, 12, 99, 0, 54]])


def peft_logits(base_dir, adapter_dir, ids=IDS):
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def folders(tiny_hf, random_b, tmp_path_factory):
    """Two PEFT folders on the tiny GPT-2: r=4 on c_attn and c_fc, alphas 8 and 12."""
    directory, _ = tiny_hf
    _, params = jlora.load_gpt2(directory)
    out = []
    for k, alpha in enumerate((8, 12)):
        cfg = jlora.LoraConfig(r=4, alpha=alpha, target_modules=("c_attn", "c_fc"))
        lora = random_b(jlora.init_lora(jax.random.key(k), cfg, params), seed=k, scale=0.5)
        out.append(save_peft(tmp_path_factory.mktemp(f"adapter{k}"), lora, cfg, base_model_name_or_path=str(directory)))
    return out


def test_combining_peft_folders_gives_a_folder_peft_loads(tiny_hf, folders, tmp_path, capsys):
    directory, _ = tiny_hf
    out = tmp_path / "ties"
    args = ["--weights", "0.6", "0.4", "--method", "ties", "--density", "0.5", "--out", str(out)]
    assert main(["combine", *map(str, folders), *args]) == 0
    assert f"ties of 2 adapters (weights 0.6, 0.4) -> {out}: rank 4, scaling 1" in capsys.readouterr().out
    cfg, lora, _ = load_peft(out)
    expected_cfg, expected = combine_adapters([load_peft(f).lora for f in folders], [0.6, 0.4], "ties", density=0.5)
    assert cfg == expected_cfg
    assert jax.tree.all(jax.tree.map(lambda x, y: np.allclose(x, y, atol=1e-6), lora, expected))
    model, params = jlora.load_gpt2(directory, lora=cfg)
    ours = np.asarray(model.apply({"params": params, "lora": lora}, IDS))
    np.testing.assert_allclose(peft_logits(directory, out), ours, atol=1e-4)


def test_population_members_and_a_run_with_trained_leaves(population_run, default_run, tmp_path):
    """Members 0 and 2 of a population with the default run (which trains ln_f), by DARE-TIES on the updates: it holds
    what the library makes of the same adapters and key, ln_f merged as a task vector, and the random base."""
    out = tmp_path / "dare"
    args = ["--member", "0,2", "--weights", "0.5", "0.3", "0.2", "--method", "dare_ties_svd", "--density", "0.7"]
    args += ["--r", "2"]
    assert main(["combine", str(population_run), str(default_run), *args, "--seed", "3", "--out", str(out)]) == 0
    sources = [load_adapter(find_checkpoint(population_run), k) for k in (0, 2)] + [
        load_adapter(find_checkpoint(default_run))
    ]
    adapters = [lora for lora, _, _ in sources]
    key = jax.random.key(3)
    cfg, lora = combine_adapters(adapters, [0.5, 0.3, 0.2], "dare_ties_svd", density=0.7, r=2, key=key)
    _, params = load_base(sources[0][2])
    leaves = combine_leaves(params, [b for _, b, _ in sources], [0.5, 0.3, 0.2], "dare_ties_svd", density=0.7, key=key)
    got_cfg, got, got_leaves = load_peft(out)
    assert got_cfg == cfg and set(got_leaves) == {"ln_f"}
    for x, y in zip(jax.tree.leaves((got, got_leaves)), jax.tree.leaves((lora, leaves)), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    ids = IDS % 257  # byte tokens
    model = jlora.GPT2(load_base(sources[0][2])[0].config, cfg)
    ours = np.asarray(model.apply({"params": overlay(params, leaves), "lora": lora}, ids))
    np.testing.assert_allclose(peft_logits(out / "base", out, ids), ours, atol=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "1"], r"weights \[1.0\] do not match the 2 adapters"),
        (["--weights", "1", "1", "--method", "ties", "--density", "1.5"], r"ties needs a density in \(0, 1\]"),
        (["--weights", "1", "1", "--r", "99"], "r=99 is more than svd can produce at h.0.attn.c_attn: at most 8"),
        (["--weights", "1", "1", "--method", "means"], "unknown combination method 'means'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["combine", *map(str, folders), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jlora combine: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_other_bases_and_members_are_refused(folders, population_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["combine", str(folders[0]), str(population_run), "--member", "0", "--weights", "1", "1",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "the adapters are on different bases" in capsys.readouterr().err
    assert main(["combine", str(population_run), "--member", "0,5", "--weights", "1", "1", "--out", str(out)]) == 2
    assert "holds a population of 3 adapters" in capsys.readouterr().err
    args = ["--member", "all", "--weights", "1", "1", "1", "--method", "linear"]
    assert main(["combine", str(population_run), *args, "--out", str(out)]) == 2
    assert "linear merges the factors, which needs one rank per module" in capsys.readouterr().err
    assert not out.exists()
