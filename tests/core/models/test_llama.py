"""The Llama family against transformers' PyTorch models: logits, LoRA at init, parameter counts, greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import jlora
from jlora.core.decoding.generate import generate
from jlora.core.lora.adapter import map_factors
from jlora.core.models.llama import LlamaConfig, inv_frequencies
from jlora.errors import ConfigError
from jlora.exchange.hf_checkpoint import load_model, save_model

IDS = np.random.default_rng(0).integers(0, 101, (2, 12))


def torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids), attention_mask=mask).logits.numpy()


def test_logits_equal_transformers(tiny_llama):
    directory, reference = tiny_llama
    model, params = load_model(directory)
    assert type(model).__name__ == "Llama" and model.config.model_type == reference.config.model_type
    ours = np.asarray(jax.jit(model.apply)({"params": params}, IDS))
    np.testing.assert_allclose(ours, torch_logits(reference, IDS), atol=1e-4, rtol=0)
    # right padding changes no real token's logits, with or without the attention mask
    mask = np.ones_like(IDS)
    mask[1, 8:] = 0
    padded = np.asarray(model.apply({"params": params}, IDS, mask))
    np.testing.assert_allclose(padded[1, :8], torch_logits(reference, IDS, mask)[1, :8], atol=1e-4, rtol=0)


def test_the_tree_and_its_checkpoint_names(tiny_llama):
    directory, reference = tiny_llama
    _, params = load_model(directory)
    layer = params["layers"]["0"]
    assert sorted(layer) == ["input_layernorm", "mlp", "post_attention_layernorm", "self_attn"]
    heads = reference.config.num_key_value_heads
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (32, heads * 8)  # (d_in, d_out): transposed on load
    assert ("bias" in layer["self_attn"]["q_proj"]) == (reference.config.model_type == "qwen2")
    assert ("lm_head" in params) == (not reference.config.tie_word_embeddings)
    np.testing.assert_array_equal(
        layer["mlp"]["down_proj"]["kernel"], reference.model.layers[0].mlp.down_proj.weight.detach().numpy().T
    )


def test_lora_starts_at_the_base_and_counts_equal_pefts(tiny_llama, random_b):
    directory, reference = tiny_llama
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("all-linear",))
    model, params = load_model(directory, lora=cfg)
    lora = jlora.init_lora(jax.random.key(0), cfg, params)
    assert sorted({p.split(".", 2)[2] for p in jlora.flatten_adapters(lora)}) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    base = model.apply({"params": params}, IDS)
    np.testing.assert_array_equal(model.apply({"params": params, "lora": lora}, IDS), base)
    assert not np.allclose(model.apply({"params": params, "lora": random_b(lora)}, IDS), base)
    for targets in (["q_proj", "v_proj"], "all-linear"):
        peft = get_peft_model(type(reference).from_pretrained(directory), PeftLoraConfig(r=4, target_modules=targets))
        ours = jlora.init_lora(jax.random.key(0), cfg.replace(target_modules=tuple(np.atleast_1d(targets))), params)
        assert jlora.lora_param_count(ours) == peft.get_nb_trainable_parameters()[0]


def test_greedy_decoding_equals_transformers_generate(tiny_llama):
    """A merged adapter, prompts of different lengths left-padded in one batch: token for token."""
    directory, reference = tiny_llama
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    model, params = load_model(directory, lora=cfg)
    lora = map_factors(
        lambda x: 0.3 * jax.random.normal(jax.random.key(1), x.shape), jlora.init_lora(jax.random.key(0), cfg, params)
    )
    merged = jlora.merge(params, lora)
    save_model(directory.parent / f"{directory.name}-merged", model.config, merged)
    tuned = type(reference).from_pretrained(directory.parent / f"{directory.name}-merged").eval()
    prompts = [[5, 17, 3, 88, 42], [70, 1], [9, 9, 9, 9, 9, 9, 9, 9, 2]]
    out = generate(model, params, prompts, lora=lora, max_new_tokens=10)
    for row, prompt in zip(out.tokens, prompts, strict=True):
        with torch.no_grad():
            expected = tuned.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        np.testing.assert_array_equal(row, expected[0, len(prompt) :].numpy())


def test_rope_scaling_is_transformers():
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = HFLlamaConfig(hidden_size=64, num_attention_heads=1, rope_theta=500000.0, rope_scaling=scaling)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    np.testing.assert_allclose(inv_frequencies(64, 500000.0, scaling), inv.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported rope_scaling type 'yarn'"),
        (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (dict(model_type="bert"), "model_type 'bert' is not a Llama-family model"),
    ],
)
def test_bad_configs_are_one_line(change, message):
    base = dict(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**{**base, **change})


def test_mistral_refuses_rows_past_its_window():
    config = LlamaConfig(model_type="mistral", sliding_window=32, max_position_embeddings=128, vocab_size=11,
                         hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    config.check_length(32)
    with pytest.raises(ConfigError, match="seq_len=33 is longer than the model's sliding_window=32"):
        config.check_length(33)


def test_the_real_smollm2_gguf_equals_transformers_reading_it():
    """jlora's GGUF path against transformers' own GGUF loading of the same file: every weight to the bit
    (our kernels are theirs transposed), and the logits of a sentence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jlora.exchange.gguf import smollm2_gguf

    file = smollm2_gguf()
    model, params = load_model("smollm2")
    reference = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    theirs = jlora.exchange.hf_checkpoint.params_from_state(
        {k: v.numpy() for k, v in reference.state_dict().items()}, model.config
    )
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theirs), strict=True):
        assert float(jnp.abs(a - b).max()) == 0.0
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    ids = np.asarray([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    ours, theirs = np.asarray(jax.jit(model.apply)({"params": params}, ids)), torch_logits(reference, ids)
    # 30 layers in float32: each side is ~1e-4 from a float64 forward (measured: jlora 1.4e-4, PyTorch 4e-5 on
    # logits up to 29), so the two agree to 2e-4, not to the 1e-4 of the 2-layer models
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
