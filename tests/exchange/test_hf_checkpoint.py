"""Loading and saving Hugging Face GPT-2 checkpoints in every layout users have."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jlora
from jlora.exchange.hf_checkpoint import CheckpointError, read_state

from ..conftest import unused_port


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tiny_hf):
    return jlora.load_gpt2(tiny_hf[0])[1]


def copy_config(src, dst):
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_keys_without_transformer_prefix(tiny_hf, reference, tmp_path):
    state = load_file(tiny_hf[0] / "model.safetensors")
    assert all(k.startswith("transformer.") or k.startswith("lm_head") for k in state)
    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    old["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal-mask buffer
    save_file(old, copy_config(tiny_hf[0], tmp_path) / "model.safetensors")
    assert_same_tree(jlora.load_gpt2(tmp_path)[1], reference)


def test_sharded_safetensors(tiny_hf, reference, tmp_path):
    state = load_file(tiny_hf[0] / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    copy_config(tiny_hf[0], tmp_path)
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_tree(jlora.load_gpt2(tmp_path)[1], reference)


def test_pickle_only_with_permission(tiny_hf, reference, tmp_path):
    state = {k: torch.tensor(v) for k, v in load_file(tiny_hf[0] / "model.safetensors").items()}
    torch.save(state, copy_config(tiny_hf[0], tmp_path) / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        jlora.load_gpt2(tmp_path)
    assert_same_tree(jlora.load_gpt2(tmp_path, allow_pickle=True)[1], reference)


def test_bfloat16_checkpoint(tiny_hf, reference, tmp_path):
    model = tiny_hf[1]
    torch_bf16 = type(model)(model.config).to(torch.bfloat16)
    torch_bf16.load_state_dict(model.state_dict())
    torch_bf16.save_pretrained(tmp_path)
    assert str(read_state(tmp_path)["transformer.wte.weight"].dtype) == "bfloat16"
    params = jlora.load_gpt2(tmp_path)[1]
    assert params["wte"]["embedding"].dtype == np.float32
    np.testing.assert_allclose(params["wte"]["embedding"], reference["wte"]["embedding"], atol=1e-3)
    bf16 = jlora.load_gpt2(tmp_path, param_dtype="bfloat16")[1]
    np.testing.assert_array_equal(
        bf16["wte"]["embedding"], params["wte"]["embedding"].astype(bf16["wte"]["embedding"].dtype)
    )


def test_missing_directory_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        jlora.load_gpt2(tmp_path / "nope")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait in tests
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as e:
        jlora.load_gpt2("jlora-test/not-a-model")
    assert str(e.value) == (
        "cannot get 'jlora-test/not-a-model': the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1) and its "
        "weights are not in the local cache; pass a local folder in its place (config.json, model.safetensors and "
        "the tokenizer files), e.g. --set model=/path/to/not-a-model"
    )


def put_in_hub_cache(cache, name: str, files_from) -> None:
    """`files_from`'s files as the Hugging Face cache keeps repository `name` at one commit of main."""
    repo = cache / f"models--{name.replace('/', '--')}"
    shutil.copytree(files_from, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_offline_a_hub_id_is_read_from_the_cache(tiny_hf_with_tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from jlora.training.data.tokenizer import load_tokenizer

    put_in_hub_cache(tmp_path, "gpt2", tiny_hf_with_tokenizer)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert_same_tree(jlora.load_gpt2("gpt2")[1], jlora.load_gpt2(tiny_hf_with_tokenizer)[1])
    text = "Question: What is 12 plus 30?"
    assert load_tokenizer("gpt2").encode(text) == load_tokenizer(str(tiny_hf_with_tokenizer)).encode(text)


def test_an_unreachable_hub_is_told_by_one_probe_without_retries():
    """A refused connection and a server that never answers: each probed once, for at most `timeout`."""
    import socket

    from jlora.exchange.hf_checkpoint import _probe, hub_unreachable

    refused = f"http://127.0.0.1:{unused_port()}"
    assert hub_unreachable(refused).startswith("unreachable (Connect")  # httpx: ConnectError; requests: ConnectionError
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hanging = f"http://127.0.0.1:{silent.getsockname()[1]}"
        reason = hub_unreachable(hanging, timeout=0.5)
        assert reason == "unreachable (ReadTimeout)"
        hits = _probe.cache_info().hits
        assert hub_unreachable(hanging, timeout=0.5) == reason
        assert _probe.cache_info().hits == hits + 1  # asked once per process


def test_mismatched_checkpoint_names_the_tensor(tiny_hf, tmp_path):
    state = load_file(tiny_hf[0] / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :64].copy()
    save_file(state, copy_config(tiny_hf[0], tmp_path) / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(32, 64\).*\(32, 128\)"):
        jlora.load_gpt2(tmp_path)
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['h\.1\.mlp\.c_fc\.kernel'\]"):
        jlora.load_gpt2(tmp_path)


def test_saved_checkpoint_loads_in_transformers(tiny_hf, tmp_path):
    from transformers import GPT2LMHeadModel

    model, params = jlora.load_gpt2(tiny_hf[0])
    jlora.save_gpt2(tmp_path, model.config, params)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = np.arange(10)[None] % 101
    with torch.no_grad():
        expected = tiny_hf[1](torch.tensor(ids)).logits.numpy()
        got = reloaded(torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_equal(got, expected)
