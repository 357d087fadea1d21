"""Parameter counts and compression: the source document's numbers, hand counts and real PEFT."""

import jax
import pytest
import torch

import jlora
from jlora.core.lora.counting import (
    adapter_compression,
    adapter_param_count,
    compression_ratio,
    lora_param_count,
    module_counts,
)
from jlora.core.models.gpt2 import GPT2Config, param_shapes


def lora_shapes(cfg, gpt2_config=None):
    """The LoRA tree's shapes for a GPT-2 without allocating it (GPT-2 small by default)."""
    params = param_shapes(gpt2_config or GPT2Config())
    return params, jax.eval_shape(lambda p: jlora.init_lora(jax.random.key(0), cfg, p), params)  # DoRA reads W


def peft_trainable(targets, r, use_dora=False, **config):
    """The trainable parameter count real PEFT reports for transformers' GPT-2 (built on 'meta')."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(HFConfig(**config))
    peft_cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), fan_in_fan_out=True, use_dora=use_dora)
    return get_peft_model(model, peft_cfg).get_nb_trainable_parameters()[0]


def test_c_attn_of_gpt2_small_at_r8():
    params, lora = lora_shapes(jlora.LoraConfig(r=8, alpha=16))
    table = module_counts(lora, params)
    assert len(table) == 12
    assert table["h.0.attn.c_attn"] == {
        "A": 6_144,
        "B": 18_432,
        "lora": 24_576,
        "weight": 768 * 2304,
        "ratio": 24_576 / (768 * 2304),
    }
    assert adapter_param_count(768, 2304, 8) == 6_144 + 18_432 == 24_576
    assert lora_param_count(lora) == 294_912
    assert peft_trainable(["c_attn"], r=8) == 294_912


def test_768_square_weight_at_r8():
    assert adapter_param_count(768, 768, 8) == 12_288
    assert 768 * 768 == 589_824
    assert round(100 * adapter_compression(768, 768, 8), 2) == 2.08


@pytest.mark.parametrize(
    "targets, peft_targets",
    [
        (("c_attn", "c_proj", "c_fc"), ["c_attn", "c_proj", "c_fc"]),
        (("mlp.c_proj",), ["mlp.c_proj"]),
    ],
)
def test_matches_peft_on_other_targets(targets, peft_targets):
    tiny = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=targets)
    _, lora = lora_shapes(cfg, GPT2Config(**tiny))
    assert lora_param_count(lora) == peft_trainable(peft_targets, r=4, **tiny)


def test_dora_counts_its_magnitudes_as_peft_does():
    params, lora = lora_shapes(jlora.LoraConfig(r=8, alpha=16, use_dora=True))
    row = module_counts(lora, params)["h.0.attn.c_attn"]
    assert (row["A"], row["B"], row["m"], row["lora"]) == (6_144, 18_432, 2_304, 26_880)  # + one m per output
    assert lora_param_count(lora) == 12 * 26_880 == peft_trainable(["c_attn"], r=8, use_dora=True)


def test_slices_and_compression_by_hand():
    tiny = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    cfg = jlora.LoraConfig(r=2, alpha=4, target_modules=("c_attn.q", "c_attn.v", "mlp.c_fc"), rank_pattern={"c_fc": 4})
    params, lora = lora_shapes(cfg, tiny)
    table = module_counts(lora, params)
    assert sorted(table) == sorted(
        f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn.q", "attn.c_attn.v", "mlp.c_fc")
    )
    assert table["h.1.attn.c_attn.v"] == {"A": 64, "B": 64, "lora": 128, "weight": 1024, "ratio": 0.125}
    assert table["h.0.mlp.c_fc"] == {"A": 128, "B": 512, "lora": 640, "weight": 4096, "ratio": 640 / 4096}
    total = 2 * (2 * 128 + 640)
    assert lora_param_count(lora) == total
    assert compression_ratio(lora, params) == total / (2 * (2 * 1024 + 4096))
