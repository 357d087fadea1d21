"""`combine_adapters` against real PEFT's ``add_weighted_adapter``, for every combination type.

One module-scoped set of four adapters on the tiny GPT-2 (random A and B, ranks, alphas, rsLoRA
and module sets that differ) goes to PEFT through `save_peft`; each method combines three of
them both ways and the logits on the same base must agree. DARE's random drops are shared: PEFT's
Bernoulli draws are replaced by the keep masks jlora drew from its key.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from transformers import GPT2LMHeadModel

import jlora
from jlora.core.algebra.combine import METHODS, UPDATE_METHODS, combine_adapters, combine_leaves, dare_masks
from jlora.core.lora.adapter import flatten_adapters
from jlora.errors import CheckpointError, ConfigError
from jlora.exchange.peft import load_peft, save_peft

IDS = np.array([[5, 17, 3, 88, 42, 9, 61, 2], [70, 1, 33, 33, 12, 99, 0, 54]])
CONFIGS = {
    "a": jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "mlp.c_proj")),
    "b": jlora.LoraConfig(r=4, alpha=6, rslora=True, target_modules=("c_attn", "mlp.c_proj")),
    "c": jlora.LoraConfig(r=4, alpha=16, target_modules=("c_attn", "c_fc")),  # other modules: the union combines
    "d": jlora.LoraConfig(r=2, alpha=3, target_modules=("c_attn",)),  # another rank: cat and the svd family
}
# The factor methods need one rank per module; the others take different ranks.
INPUTS = {m: ("a", "b", "c") if m in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune") else "abd"
          for m in METHODS}  # fmt: skip
WEIGHTS = [0.7, -0.4, 1.2]


def options(method):
    density = 0.5 if method not in ("linear", "cat", "svd") else None
    rank = None if method in ("svd",) or method not in UPDATE_METHODS else 3  # svd: PEFT's default rank
    sign = "frequency" if method == "ties" else "total"
    return density, rank, sign


@pytest.fixture(scope="module")
def setup(tiny_hf, random_b, tmp_path_factory):
    directory, _ = tiny_hf
    model, params = jlora.load_gpt2(directory)
    adapters, peft = {}, None
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        lora = random_b(jlora.init_lora(jax.random.key(seed), cfg, params), seed=10 + seed, scale=0.5)
        adapters[name] = (cfg, lora)
        folder = save_peft(tmp_path_factory.mktemp(name), lora, cfg, base_model_name_or_path=str(directory))
        if peft is None:
            peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(directory), folder, adapter_name=name)
        else:
            peft.load_adapter(folder, adapter_name=name)
    return model, params, adapters, peft.eval()


def trees(pairs):
    """The adapter trees of (config, tree) pairs: what combine_adapters takes (the configs: the tests' reference)."""
    return [lora for _, lora in pairs]


@functools.partial(jax.jit, static_argnums=(0, 1))
def logits(model, cfg, params, lora):
    return model.clone(lora=cfg).apply({"params": params, "lora": lora}, IDS)


def shared_masks(monkeypatch, adapters, masks, method):
    """Make PEFT's DARE drop what jlora's `masks` drop: each tensor PEFT prunes is matched to its jlora twin."""
    twins = []
    for (cfg, lora), own in zip(adapters, masks):
        for path, adapter in flatten_adapters(lora).items():
            if method in UPDATE_METHODS:  # PEFT prunes dW in the Conv1D layout (d_in, d_out)
                s = cfg.scaling_for(path)
                twins.append((np.asarray(s * adapter["B"] @ adapter["A"]).T, np.asarray(own[path]).T))
            else:
                twins += [(np.asarray(adapter[n]), np.asarray(own[path][n])) for n in ("A", "B")]

    def random_pruning(tensor, density, rescale):
        value = tensor.numpy()
        diffs = [np.abs(t - value).max() if t.shape == value.shape else np.inf for t, _ in twins]
        assert min(diffs) < 1e-5, "a tensor PEFT prunes has no jlora twin"
        keep = torch.from_numpy(twins[int(np.argmin(diffs))][1]).to(tensor.dtype)
        return tensor * keep / density if rescale else tensor * keep

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_peft(setup, method, monkeypatch):
    model, params, adapters, peft = setup
    names = INPUTS[method]
    chosen = [adapters[n] for n in names]
    density, rank, sign = options(method)
    masks = dare_masks(jax.random.key(7), trees(chosen), method, density) if method.startswith("dare") else None
    cfg, lora = combine_adapters(
        trees(chosen), WEIGHTS, method, density=density, r=rank, mask=masks, majority_sign_method=sign
    )
    if masks is not None:
        shared_masks(monkeypatch, chosen, masks, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.add_weighted_adapter(list(names), WEIGHTS, method, combination_type=method, svd_rank=rank,
                                  density=density, majority_sign_method=sign)  # fmt: skip
    peft.set_adapter(method)
    with torch.no_grad():
        expected = peft(torch.tensor(IDS)).logits.numpy()
    base = np.asarray(model.apply({"params": params}, IDS))
    ours = np.asarray(logits(model, cfg, params, lora))
    assert np.abs(expected - base).max() > 1e-2  # the combination changes the model
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    # PEFT's new adapter: alpha = r (scaling 1), r = the inputs' (factors), their sum (cat) or svd_rank
    peft_cfg = peft.peft_config[method]
    assert peft_cfg.lora_alpha == peft_cfg.r
    ranks = {a["A"].shape[0] for a in flatten_adapters(lora).values()}
    assert max(ranks) == peft_cfg.r and all(cfg.scaling_for(p) == 1.0 for p in flatten_adapters(lora))
    assert all(float(a["scaling"]) == 1.0 for a in flatten_adapters(lora).values())


def test_svd_is_the_best_rank_r_approximation_of_the_weighted_sum(setup):
    """Against numpy: the dense sum_i w_i scaling_i B_i A_i, its top-3 singular triplets; cat is the sum exactly."""
    _, _, adapters, _ = setup
    chosen = [adapters[n] for n in "abd"]
    path = "h.1.attn.c_attn"
    dense = sum(
        w * cfg.scaling_for(path) * np.asarray(flatten_adapters(lora)[path]["B"] @ flatten_adapters(lora)[path]["A"])
        for w, (cfg, lora) in zip(WEIGHTS, chosen)
    ).astype(np.float64)
    u, s, vt = np.linalg.svd(dense)
    cfg, lora = combine_adapters(trees(chosen), WEIGHTS, "svd", r=3)
    got = flatten_adapters(lora)[path]
    np.testing.assert_allclose(np.asarray(got["B"] @ got["A"]), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
    np.testing.assert_allclose(jlora.delta_svd(lora)[path]["singular_values"], s[:3], rtol=1e-5)
    cat_cfg, cat = combine_adapters(trees(chosen), WEIGHTS, "cat")
    got = flatten_adapters(cat)[path]
    assert cat_cfg.rank_for(path) == 10 and cat_cfg.scaling_for(path) == 1.0  # 4 + 4 + 2
    np.testing.assert_allclose(np.asarray(got["B"] @ got["A"]), dense, atol=1e-5)


def test_the_result_is_an_ordinary_adapter(setup, tmp_path):
    """It merges to the same logits and goes to a PEFT folder and back unchanged; clamp clips as PEFT's."""
    model, params, adapters, _ = setup
    pair = trees([adapters["a"], adapters["c"]])
    cfg, lora = combine_adapters(pair, [1.0, 0.5], "ties_svd", density=0.6, clamp=0.9)
    merged = jlora.merge(params, lora)
    np.testing.assert_allclose(model.apply({"params": merged}, IDS), logits(model, cfg, params, lora), atol=1e-5)
    back_cfg, back, _ = load_peft(save_peft(tmp_path / "combined", lora, cfg, base_model_name_or_path=None))
    assert back_cfg == cfg and jax.tree.structure(back) == jax.tree.structure(lora)
    _, unclamped = combine_adapters(pair, [1.0, 0.5], "ties_svd", density=0.6)
    for path, adapter in flatten_adapters(lora).items():
        raw = flatten_adapters(unclamped)[path]
        high = np.quantile(np.concatenate([np.ravel(raw["B"]), np.ravel(raw["A"])]), 0.9)
        for name in ("A", "B"):
            np.testing.assert_allclose(adapter[name], np.clip(raw[name], -high, high), atol=1e-6)


def test_dare_masks_come_from_the_key(setup):
    _, _, adapters, _ = setup
    chosen = trees([adapters["a"], adapters["b"]])
    masks = dare_masks(jax.random.key(3), chosen, "dare_linear", 0.25)
    keep = np.concatenate([np.ravel(m[n]) for own in masks for m in own.values() for n in ("A", "B")])
    assert abs(keep.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / keep.size)
    same = combine_adapters(chosen, [1.0, 1.0], "dare_linear", density=0.25, key=jax.random.key(3))[1]
    given = combine_adapters(chosen, [1.0, 1.0], "dare_linear", density=0.25, mask=masks)[1]
    other = combine_adapters(chosen, [1.0, 1.0], "dare_linear", density=0.25, key=jax.random.key(4))[1]
    assert jax.tree.all(jax.tree.map(jnp.array_equal, same, given))
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, same, other))


def test_trained_base_leaves_merge_as_task_vectors():
    base = {"ln_f": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    one = {"ln_f": {"scale": jnp.array([2.0, 1.0, 0.0, 1.0]), "bias": jnp.array([1.0, -1.0, 0.5, 0.0])}}
    two = {"ln_f": {"scale": jnp.array([0.0, 1.0, 3.0, 1.0]), "bias": jnp.array([1.0, 1.0, 0.5, 2.0])}}
    linear = combine_leaves(base, [one, two], [0.5, 0.5], "cat")
    np.testing.assert_allclose(linear["ln_f"]["scale"], [1.0, 1.0, 1.5, 1.0])  # 1 + (0.5 * 1 + 0.5 * -1), ...
    ties = combine_leaves(base, [one, None], [1.0, 1.0], "ties", density=1.0)
    np.testing.assert_allclose(ties["ln_f"]["bias"], one["ln_f"]["bias"])  # an adapter without it adds nothing
    assert combine_leaves(base, [None, {}], [1.0, 1.0], "svd") == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(method="mean"), "unknown combination method 'mean'"),
        (dict(weights=[1.0]), r"weights \[1.0\] do not match the 2 adapters"),
        (dict(method="ties", density=0.0), r"ties needs a density in \(0, 1\]"),
        (dict(method="ties", density=1.5), r"ties needs a density in \(0, 1\]"),
        (dict(density=0.5), "svd takes no density"),
        (dict(method="linear", r=2), "linear keeps the inputs' ranks and takes no r"),
        (dict(r=7), r"r=7 is more than svd can produce at h.0.attn.c_attn: at most 6"),
        (dict(method="ties_svd", density=0.5, r=33), r"r=33 is more than ties_svd can produce .* 32 -> 96"),
        (dict(method="dare_ties", density=0.5), "dare_ties drops entries at random: pass key="),
        (dict(method="ties", density=0.5), r"h.0.attn.c_attn has ranks \[2, 4\]; use cat"),
    ],
)
def test_bad_input_is_one_line(setup, change, message):
    _, _, adapters, _ = setup
    args = dict(adapters=trees([adapters["a"], adapters["d"]]), weights=[1.0, 1.0], method="svd") | change
    with pytest.raises((ConfigError, CheckpointError), match=message):
        combine_adapters(**args)


def test_adapters_that_cannot_combine(setup):
    _, params, adapters, _ = setup
    dora = jlora.LoraConfig(r=4, use_dora=True)
    with pytest.raises(CheckpointError, match="adapter 1 is a DoRA adapter"):
        combine_adapters([adapters["a"][1], jlora.init_lora(jax.random.key(0), dora, params)], [1, 1], "cat")
    qv = jlora.LoraConfig(r=4, target_modules=("c_attn.q", "c_attn.v"))
    with pytest.raises(CheckpointError, match="h.0.attn.c_attn is adapted whole by adapter 0 and in slices"):
        combine_adapters([adapters["a"][1], jlora.init_lora(jax.random.key(0), qv, params)], [1, 1], "cat")
    wide = {"h": {"0": {"attn": {"c_attn": {"A": jnp.ones((4, 64)), "B": jnp.ones((192, 4)), "scaling": 2.0}}}}}
    with pytest.raises(CheckpointError, match="adapters of different base models"):
        combine_adapters([adapters["a"][1], wide], [1, 1], "cat")
