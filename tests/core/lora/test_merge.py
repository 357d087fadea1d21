"""merge / unmerge against the unmerged LoRA model's logits and a numpy merge, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.lora.adapter import flatten_adapters, get_path, output_columns, split_slice, unflatten_adapters

TARGETS = {
    "c_attn": dict(target_modules=("c_attn",)),
    "q_v_slices": dict(target_modules=("c_attn.q", "c_attn.v")),
    "proj_and_mlp": dict(target_modules=("attn.c_proj", "mlp.c_fc", "mlp.c_proj"), rank_pattern={"c_fc": 2}),
    "rslora_all": dict(target_modules=("c_attn.k", "c_proj", "c_fc"), rslora=True, alpha_pattern={"c_fc": 3.0}),
}


@pytest.fixture
def adapted(tiny_hf, random_b):
    """``adapted(param_dtype="float32", **lora_kwargs) -> (model, params, lora with a random B, cfg)``."""

    def make(param_dtype="float32", **lora_kwargs):
        cfg = jlora.LoraConfig(r=4, alpha=8, **lora_kwargs)
        model, params = jlora.load_gpt2(tiny_hf[0], lora=cfg, param_dtype=param_dtype)
        lora = random_b(jlora.init_lora(jax.random.key(1), model, params), seed=0)
        return model, params, lora, cfg

    return make


def numpy_merge(params, lora, cfg):
    """The merge written out in numpy float64: {module path: merged (d_in, d_out) kernel}."""
    merged = {}
    for path, ad in flatten_adapters(lora).items():
        module = split_slice(path)[0]
        kernel = merged.setdefault(module, np.asarray(get_path(params, module)["kernel"], np.float64).copy())
        delta = cfg.scaling_for(path) * np.asarray(ad["B"], np.float64) @ np.asarray(ad["A"], np.float64)
        kernel[:, output_columns(path, kernel.shape[1])] += delta.T
    return merged


@pytest.mark.parametrize("name", ["c_attn", "q_v_slices", "proj_and_mlp"])  # rslora_all: by the numpy merge below
def test_merged_base_model_equals_lora_model(adapted, name):
    model, params, lora, cfg = adapted(**TARGETS[name])
    ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 12), 0, 101))
    with_lora = model.apply({"params": params, "lora": lora}, ids)
    base = model.apply({"params": params}, ids)
    assert float(jnp.abs(with_lora - base).max()) > 1e-2  # the adapters really change the model
    merged = jlora.merge(params, lora)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), with_lora, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(TARGETS))
def test_merge_is_the_numpy_merge_and_touches_only_adapted_columns(adapted, name):
    _, params, lora, cfg = adapted(**TARGETS[name])
    merged = jlora.merge(params, lora)
    expected = numpy_merge(params, lora, cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(merged):
        keys = [k.key for k in key_path]
        module = ".".join(keys[:-1])
        if keys[-1] == "kernel" and module in expected:
            np.testing.assert_allclose(leaf, expected[module], atol=1e-6, rtol=1e-6)
        else:
            assert leaf is get_path(params, ".".join(keys))  # every other leaf is passed through untouched
    if name == "q_v_slices":  # the k third of c_attn has no adapter: bit-identical
        for i in ("0", "1"):
            k_cols = slice(32, 64)
            np.testing.assert_array_equal(
                merged["h"][i]["attn"]["c_attn"]["kernel"][:, k_cols],
                params["h"][i]["attn"]["c_attn"]["kernel"][:, k_cols],
            )


@pytest.mark.parametrize("name", ["c_attn", "q_v_slices", "proj_and_mlp"])
def test_unmerge_inverts_merge_within_float32_rounding(adapted, name):
    _, params, lora, cfg = adapted(**TARGETS[name])
    merged = jlora.merge(params, lora)
    back = jlora.unmerge(merged, lora)
    for original, merged_leaf, restored in zip(jax.tree.leaves(params), jax.tree.leaves(merged), jax.tree.leaves(back)):
        # merge and unmerge each round once: the error is at most an ulp of the larger magnitude
        bound = 2 * np.spacing(np.maximum(np.abs(np.asarray(original)), np.abs(np.asarray(merged_leaf))))
        assert np.all(np.abs(np.asarray(restored) - np.asarray(original)) <= bound)


def test_bfloat16_weights_are_rounded_once(adapted):
    _, params, lora, cfg = adapted(param_dtype="bfloat16", target_modules=("c_attn.q", "c_attn.v", "mlp.c_fc"))
    merged = jlora.merge(params, lora)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(merged))
    for module, kernel in numpy_merge(params, lora, cfg).items():
        # q and v both land in float32 first, then one cast: the float64 sum rounded once to bfloat16
        # equals it except where float32 accumulation itself sits on a bfloat16 rounding tie
        got = np.asarray(get_path(merged, module)["kernel"], np.float32)
        once = np.asarray(jnp.asarray(kernel.astype(np.float32)).astype(jnp.bfloat16), np.float32)
        assert np.mean(got == once) > 0.999
        np.testing.assert_allclose(got, once, rtol=2**-7, atol=0)


def test_merge_under_jit_gives_the_same_params(adapted):
    _, params, lora, cfg = adapted(**TARGETS["q_v_slices"])
    jitted = jax.jit(jlora.merge)(params, lora)
    jax.tree.map(np.testing.assert_array_equal, jitted, jlora.merge(params, lora))


@pytest.mark.parametrize("fn", [jlora.merge, jlora.unmerge])
def test_non_finite_result_is_refused_naming_the_module(adapted, fn):
    _, params, lora, cfg = adapted(**TARGETS["q_v_slices"])
    bad = flatten_adapters(lora)
    bad["h.1.attn.c_attn.v"]["B"] = bad["h.1.attn.c_attn.v"]["B"].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"non-finite .* h\.1\.attn\.c_attn\b") as err:
        fn(params, unflatten_adapters(bad))
    assert "h.0" not in str(err.value)
    huge = flatten_adapters(lora)
    for name in ("A", "B"):  # each finite, but their product overflows float32
        huge["h.0.attn.c_attn.q"][name] = jnp.full_like(huge["h.0.attn.c_attn.q"][name], 1e20)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn"):
        fn(params, unflatten_adapters(huge))


def test_mis_shaped_adapter_is_refused(adapted):
    _, params, lora, cfg = adapted()
    flat = flatten_adapters(lora)
    flat["h.0.attn.c_attn"]["B"] = flat["h.0.attn.c_attn"]["B"][:32]
    with pytest.raises(ValueError, match=r"adapter h\.0\.attn\.c_attn does not fit"):
        jlora.merge(params, unflatten_adapters(flat))


def test_adapter_without_a_weight_is_refused(adapted):
    _, params, lora, cfg = adapted()
    flat = flatten_adapters(lora)
    flat["h.7.attn.c_attn"] = flat["h.0.attn.c_attn"]
    with pytest.raises(ValueError, match=r"\['h\.7\.attn\.c_attn'\], which have no kernel"):
        jlora.merge(params, unflatten_adapters(flat))
