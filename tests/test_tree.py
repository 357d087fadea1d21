"""jlora.tree: dotted paths over nested-dict pytrees, and the trainable-partition helpers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jlora.errors import CheckpointError
from jlora.tree import (
    all_finite,
    dotted,
    get_path,
    has_path,
    leaves_by_path,
    overlay,
    prune,
    replace_paths,
    restore,
    unflatten,
)

PARAMS = {
    "h": {"0": {"attn": {"c_attn": {"kernel": np.ones((2, 6)), "bias": np.zeros(6)}}}},
    "ln_f": {"scale": np.ones(2), "bias": np.zeros(2)},
}


def test_leaves_by_path_names_every_leaf_in_tree_order():
    assert list(leaves_by_path(PARAMS)) == ["h.0.attn.c_attn.bias", "h.0.attn.c_attn.kernel", "ln_f.bias", "ln_f.scale"]


def test_dotted_reads_dict_keys_and_sequence_indices():
    import jax

    (path, _), *_ = jax.tree_util.tree_leaves_with_path({"a": [None, {"b": 1}]})
    assert dotted(path) == "a.1.b"


def test_get_and_has_path():
    assert get_path(PARAMS, "h.0.attn.c_attn")["kernel"].shape == (2, 6)
    assert has_path(PARAMS, "ln_f.scale") and not has_path(PARAMS, "h.1") and not has_path(PARAMS, "ln_f.scale.x")


def test_replace_paths_swaps_only_the_named_leaves():
    new = replace_paths(PARAMS, {"ln_f.scale": np.full(2, 3.0)})
    assert new["ln_f"]["scale"].tolist() == [3.0, 3.0]
    assert new["h"]["0"]["attn"]["c_attn"]["kernel"] is PARAMS["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert PARAMS["ln_f"]["scale"].tolist() == [1.0, 1.0]  # the input tree is not changed


def test_unflatten_inverts_leaves_by_path():
    assert unflatten(leaves_by_path(PARAMS)) == PARAMS


def test_prune_and_restore_are_inverse_on_the_template():
    trainable = {"params": {"ln_f": {"scale": None, "bias": jnp.ones(2)}, "wte": None}, "lora": {"A": jnp.zeros(3)}}
    saved = prune(trainable)
    assert saved == {"params": {"ln_f": {"bias": trainable["params"]["ln_f"]["bias"]}}, "lora": trainable["lora"]}
    again = restore(trainable, saved)
    assert again["params"]["wte"] is None and again["params"]["ln_f"]["scale"] is None
    assert again["params"]["ln_f"]["bias"] is trainable["params"]["ln_f"]["bias"]


def test_overlay_checks_names_and_shapes():
    out = overlay(PARAMS, {"ln_f": {"bias": np.full(2, 5.0)}})
    assert out["ln_f"]["bias"].tolist() == [5.0, 5.0] and out["ln_f"]["scale"] is PARAMS["ln_f"]["scale"]
    with pytest.raises(CheckpointError, match="'wpe' is not in the base model"):
        overlay(PARAMS, {"wpe": np.ones(2)})
    with pytest.raises(CheckpointError, match=r"'bias' has shape \(3,\), the base \(2,\)"):
        overlay(PARAMS, {"ln_f": {"bias": np.ones(3)}})


def test_all_finite():
    assert all_finite(PARAMS) and all_finite({})
    assert not all_finite({"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.nan])}})
