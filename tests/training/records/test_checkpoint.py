"""Orbax checkpoints of the adapter and optimizer state, and the base model's identity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora.core.models.gpt2 import GPT2Config
from jlora.training.records import checkpoint as ckpt

TINY = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def params():
    return jlora.init_params(jax.random.key(0), TINY)


def test_base_identity_hashes_weights(params):
    identity = ckpt.base_identity("tiny", params)
    assert identity["shapes"]["h.0.attn.c_attn.kernel"] == [16, 48]
    assert identity == ckpt.base_identity("tiny", jax.tree.map(np.array, params))
    nudged = jax.tree.map(lambda x: x, params)
    nudged["ln_f"] = {"scale": params["ln_f"]["scale"].at[0].add(1e-3), "bias": params["ln_f"]["bias"]}
    assert ckpt.base_identity("tiny", nudged)["sha256"] != identity["sha256"]
    ckpt.check_base(identity, params)
    with pytest.raises(ckpt.BaseMismatchError, match="weights differ.*allow_different_weights=True"):
        ckpt.check_base(identity, nudged)
    ckpt.check_base(identity, nudged, allow_different_weights=True)


def test_shape_mismatch_names_module_and_shapes(params):
    identity = ckpt.base_identity("tiny", params)
    other = jlora.init_params(
        jax.random.key(0), GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    )
    with pytest.raises(ckpt.BaseMismatchError, match=r"h\.0\.attn\.c_attn has shape \(32, 96\).*\(16, 48\)"):
        ckpt.check_base(identity, {**params, "h": other["h"]})


def test_save_restore_round_trip(params, tmp_path):
    lora = jlora.init_lora(jax.random.key(1), jlora.LoraConfig(r=2, alpha=4), params)
    adapter = {"lora": lora, "base": {"ln_f": params["ln_f"]}}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = optimizer.init(adapter)
    _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, adapter), opt_state), opt_state
    opt_state = optimizer.update(jax.tree.map(jnp.ones_like, adapter), opt_state)[1]
    manager = ckpt.open_manager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(manager, step, adapter, opt_state, {"step": step, "lora_config": jlora.LoraConfig(r=2).to_dict()})
    assert manager.all_steps() == [2, 3]
    assert ckpt.latest_checkpoint(tmp_path).name == "3"
    restored, restored_opt, meta = ckpt.restore(manager, 3, adapter, opt_state)
    assert meta["step"] == 3
    assert jax.tree.structure(restored_opt) == jax.tree.structure(opt_state)
    for a, b in zip(jax.tree.leaves((adapter, opt_state)), jax.tree.leaves((restored, restored_opt))):
        np.testing.assert_array_equal(a, b)
    # The adapter alone, without the manager or the run directory: with jlora and with plain Orbax.
    lora2, base2, meta2 = ckpt.load_adapter(tmp_path / "checkpoints" / "3")
    assert ckpt.lora_config_of(meta2) == jlora.LoraConfig(r=2)
    plain = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / "3" / "adapter").absolute())
    for tree in (lora2, plain["lora"]):
        assert jax.tree.structure(tree) == jax.tree.structure(lora)
        np.testing.assert_array_equal(tree["h"]["1"]["attn"]["c_attn"]["A"], lora["h"]["1"]["attn"]["c_attn"]["A"])
    np.testing.assert_array_equal(base2["ln_f"]["scale"], params["ln_f"]["scale"])


def test_adapter_checkpoint_travels_alone(tmp_path, tiny_hf_with_tokenizer):
    """A checkpoint folder copied away from its run loads in a fresh process onto its base; bases are checked."""
    import shutil
    import subprocess
    import sys

    from jlora.cli import main
    from jlora.core.models.gpt2 import GPT2Config
    from jlora.training.records.artifacts import load_checkpoint, load_run

    base = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    args = ["configs/gpt2_qa.yaml", "--set", f"model={base}", "--set", "steps=2", "--set", "exact_match=0"]
    assert main(["train", *args, "--set", "eval_batches=1", "--set", "seq_len=64", "--out", str(run)]) == 0
    model, params, lora, lora_cfg, _ = load_run(run)
    ids = np.arange(24).reshape(2, 12) % 200
    expected = np.asarray(model.apply({"params": params, "lora": lora}, ids))
    moved = tmp_path / "moved"
    shutil.copytree(run / "checkpoints" / "2", moved)
    shutil.rmtree(run)
    script = (
        "import sys, numpy as np; from jlora.training.records.artifacts import load_checkpoint\n"
        "m, p, l, c, meta = load_checkpoint(sys.argv[1], base=sys.argv[2])\n"
        "ids = np.arange(24).reshape(2, 12) % 200\n"
        "np.save(sys.argv[3], np.asarray(m.apply({'params': p, 'lora': l}, ids)))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(moved), str(base), str(tmp_path / "out.npy")], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)

    other = tmp_path / "other_weights"  # same shapes, one weight nudged
    shutil.copytree(base, other)
    from safetensors.numpy import load_file, save_file

    state = load_file(other / "model.safetensors")
    state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + 1e-3
    save_file(state, other / "model.safetensors")
    with pytest.raises(ckpt.BaseMismatchError, match="weights differ"):
        load_checkpoint(moved, base=str(other))
    load_checkpoint(moved, base=str(other), allow_different_weights=True)

    wider = tmp_path / "wider"  # different shapes: named module and both shapes
    jlora.save_gpt2(
        wider,
        GPT2Config(vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=2),
        jlora.init_params(
            jax.random.key(0), GPT2Config(vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=2)
        ),
    )
    with pytest.raises(
        ckpt.BaseMismatchError, match=r"h\.0\.attn\.c_attn has shape \(64, 192\), the adapter was trained on \(32, 96\)"
    ):
        load_checkpoint(moved, base=str(wider))
