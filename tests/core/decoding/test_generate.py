"""Decoding with the KV cache, against transformers' PyTorch GPT-2 and its `generate`."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import jlora
from jlora.core.algebra.mixed import stack_adapters
from jlora.core.decoding.generate import _decoder, filter_logits, generate
from jlora.core.lora.adapter import map_factors, without_scaling
from jlora.core.models.gpt2 import GPT2, init_cache

from ...conftest import TINY, make_hf_checkpoint

PROMPTS = [[5, 17, 3, 88, 42], [70, 1], [9, 9, 9, 9, 9, 9, 9, 9, 2]]


@pytest.fixture(scope="module")
def lively_hf(tmp_path_factory):
    """A tiny GPT-2 with larger random weights, so greedy decoding does not just repeat one token."""
    directory = tmp_path_factory.mktemp("lively_gpt2")
    return directory, make_hf_checkpoint(directory, seed=5, initializer_range=0.4, **TINY)


def left_pad(rows, length=None):
    length = length or max(map(len, rows))
    ids, mask = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :], mask[i, length - len(row) :] = row, 1
    return ids, mask


def hf_generate(model, prompts, eos, max_new_tokens):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[:, ids.shape[1] :].numpy()


def test_cached_decoding_matches_transformers_logits(lively_hf):
    """Prefill a left-padded batch, then feed a 2-token chunk and single tokens through the cache."""
    directory, reference = lively_hf
    model, params = jlora.load_gpt2(directory)
    prompt_ids, prompt_mask = left_pad(PROMPTS, length=10)
    forced = np.array([[4, 8, 15, 16], [23, 42, 1, 2], [3, 5, 7, 11]])
    cache = init_cache(model.config, 3, 16)

    def decode(ids, mask, cache):
        hidden, cache = model.apply({"params": params}, ids, cache, mask, method=GPT2.decode)
        return model.apply({"params": params}, hidden, method=GPT2.logits), cache

    step = jax.jit(decode)
    logits, cache = step(prompt_ids, prompt_mask, cache)
    chunks = [logits]
    for chunk in (forced[:, :2], forced[:, 2:3], forced[:, 3:]):
        logits, cache = step(chunk, np.ones_like(chunk), cache)
        chunks.append(logits)
    ours = np.concatenate(chunks, axis=1)
    assert int(cache["index"]) == 14 and cache["h"]["1"]["k"].shape == (3, 16, 4, 8)

    ids = np.concatenate([prompt_ids, forced], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(forced)], axis=1)
    positions = np.maximum(mask.cumsum(1) - 1, 0)  # transformers' generate derives them so
    with torch.no_grad():
        expected = reference(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)


def test_greedy_with_merged_adapter_equals_transformers_generate(lively_hf, tmp_path):
    directory, _ = lively_hf
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc"))
    model, params = jlora.load_gpt2(directory, lora=cfg)
    lora = jlora.init_lora(jax.random.key(0), model, params)
    lora = jax.tree.map(
        lambda x: x if x.ndim == 0 or x.shape[0] == 4 else 0.3 * jax.random.normal(jax.random.key(1), x.shape), lora
    )  # B random (A has 4 rows; the scale, no axis, stays)
    merged_dir = jlora.save_gpt2(tmp_path / "merged", model.config, jlora.merge(params, lora))
    reference = GPT2LMHeadModel.from_pretrained(merged_dir).eval()

    free = generate(model, params, PROMPTS, lora=lora, max_new_tokens=12)
    eos = int(free.tokens[0, 5])  # a token row 0 makes mid-way: rows must stop there
    out = generate(model, params, PROMPTS, lora=lora, max_new_tokens=12, eos_token_id=eos)
    expected = hf_generate(reference, PROMPTS, eos, 12)
    assert out.lengths[0] <= 6 and out.lengths.min() < 12
    np.testing.assert_array_equal(out.tokens[:, : expected.shape[1]], expected)
    assert (out.tokens[:, expected.shape[1] :] == eos).all()
    for row, n, seq in zip(out.tokens, out.lengths, out.sequences(), strict=True):
        assert row[n - 1] == eos or n == 12
        assert seq == [int(t) for t in row[:n] if t != eos] and eos not in seq
    assert out.tokens_per_s > 0 and out.seconds > 0


@pytest.mark.parametrize("options", [dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.3),
                                     dict(no_repeat_ngram_size=3, repetition_penalty=0.7)])  # fmt: skip
def test_greedy_with_repetition_processors_equals_transformers_generate(lively_hf, options):
    """Greedy decoding's processors act on the logits (beam search's on log-probabilities: test_beam.py)."""
    directory, reference = lively_hf
    model, params = jlora.load_gpt2(directory)
    plain = generate(model, params, PROMPTS, max_new_tokens=12)
    eos = int(plain.tokens[1, 6])
    out = generate(model, params, PROMPTS, max_new_tokens=12, eos_token_id=eos, **options)
    ids, mask = left_pad(PROMPTS)
    ids[mask == 0] = eos  # end-of-text as padding: transformers counts the padding's n-grams, jlora does not
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                                      do_sample=False, eos_token_id=eos, pad_token_id=eos, **options)  # fmt: skip
    expected = expected[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(out.tokens[:, : expected.shape[1]], expected)
    assert not np.array_equal(out.tokens, generate(model, params, PROMPTS, max_new_tokens=12, eos_token_id=eos).tokens)


def test_one_compilation_serves_every_token_and_nearby_prompts(lively_hf, caplog):
    """The decoding loop is compiled once; other prompts (same padded length) and options reuse it."""
    directory, _ = lively_hf
    model, params = jlora.load_gpt2(directory)
    generate(model, params, PROMPTS, max_new_tokens=12, temperature=0.7, seed=0)
    compiled = _decoder.cache_info().currsize
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        again = generate(model, params, [[7] * 11, [8, 9], [1]], max_new_tokens=12, temperature=0.9, top_k=5, seed=3)
        again_eos = generate(model, params, [[4] * 16, [5], [6]], max_new_tokens=12, temperature=1.1, eos_token_id=2)
    assert again.compile_seconds == again_eos.compile_seconds == 0.0
    assert _decoder.cache_info().currsize == compiled
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def lively_adapters(model, params, configs, seed=0):
    """(cfg, lora) per config, A and B random and large enough to change what greedy decoding writes."""
    out = []
    for k, cfg in enumerate(configs):
        leaves, treedef = jax.tree.flatten(without_scaling(jlora.init_lora(jax.random.key(seed + k), cfg, params)))
        keys = jax.random.split(jax.random.key(100 + seed + k), len(leaves))
        lively = treedef.unflatten([0.3 * jax.random.normal(key, x.shape) for key, x in zip(keys, leaves)])
        out.append((cfg, jlora.with_scaling(lively, cfg)))
    return out


def trees(pairs):
    """The adapter trees of (config, tree) pairs: what stack_adapters takes."""
    return [lora for _, lora in pairs]


def test_mixed_greedy_generation_equals_each_rows_adapter_alone(lively_hf):
    """Rows answered by different adapters in one batch write, row by row, what each adapter writes alone."""
    model, params = jlora.load_gpt2(lively_hf[0])
    configs = [
        jlora.LoraConfig(r=4, alpha=8, target_modules=("attn.c_proj", "c_fc")),
        jlora.LoraConfig(r=2, alpha=6, rslora=True, target_modules=("c_attn.k", "mlp.c_proj")),
        jlora.LoraConfig(r=4, alpha=2, target_modules=("c_attn.q", "c_attn.v", "c_fc")),
    ]
    adapters = lively_adapters(model, params, configs)
    prompts, index = PROMPTS * 2, [0, 1, 2, -1, 2, 0]
    stack = stack_adapters(trees(adapters))
    free = generate(model, params, prompts, adapters=stack, adapter_index=index, max_new_tokens=12)
    eos = int(free.tokens[0, 5])  # a token row 0 makes mid-way: rows stop at different steps
    mixed = generate(model, params, prompts, adapters=stack, adapter_index=index,
                     max_new_tokens=12, eos_token_id=eos)  # fmt: skip
    assert len({tuple(row) for row in mixed.tokens}) == len(prompts)  # the adapters change what is written
    for n, (prompt, k) in enumerate(zip(prompts, index)):
        if k < 0:
            alone = generate(model, params, [prompt], max_new_tokens=12, eos_token_id=eos)
        else:
            cfg, lora = adapters[k]
            alone = generate(model.clone(lora=cfg), params, [prompt], lora=lora, max_new_tokens=12, eos_token_id=eos)
        np.testing.assert_array_equal(mixed.tokens[n], alone.tokens[0])
        assert mixed.lengths[n] == alone.lengths[0]


def test_adapters_are_arguments_k_adapters_compile_once(lively_hf, caplog):
    """Adapters of equal shapes, one after another or stacked as a mixed batch: one compilation each way."""
    model, params = jlora.load_gpt2(lively_hf[0])
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc"))
    adapters = lively_adapters(model, params, [cfg] * 4, seed=10)
    misses = _decoder.cache_info().misses
    model = model.clone(lora=cfg)
    first = generate(model, params, PROMPTS, lora=adapters[0][1], max_new_tokens=8)
    mixed = generate(model, params, PROMPTS, adapters=stack_adapters(trees(adapters[:2])), adapter_index=[0, 1, 1],
                     max_new_tokens=8)  # fmt: skip
    assert first.compile_seconds > 0 and mixed.compile_seconds > 0
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        swapped = [generate(model, params, PROMPTS, lora=lora, max_new_tokens=8) for _, lora in adapters[1:]]
        other = generate(model, params, PROMPTS, adapters=stack_adapters(trees(adapters[2:])), adapter_index=[1, 0, 1],
                         max_new_tokens=8)  # fmt: skip
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert _decoder.cache_info().misses == misses + 2  # one program for every single adapter, one per stack shape
    assert all(out.compile_seconds == 0.0 for out in [*swapped, other])
    assert len({first.tokens.tobytes(), *(out.tokens.tobytes() for out in swapped)}) == 4  # four different adapters
    assert not np.array_equal(other.tokens, mixed.tokens)


def test_mixed_generation_refuses_a_bad_index(lively_hf):
    model, params = jlora.load_gpt2(lively_hf[0])
    stack = stack_adapters(trees(lively_adapters(model, params, [jlora.LoraConfig(r=2)] * 2)))
    with pytest.raises(ValueError, match="adapter index 2 is outside the stack of 2 adapters"):
        generate(model, params, PROMPTS, adapters=stack, adapter_index=[0, 1, 2])
    with pytest.raises(ValueError, match="give lora= .* or adapters= with adapter_index="):
        generate(model, params, PROMPTS, adapters=stack)


def test_filter_logits_matches_transformers_warpers():
    logits = np.random.default_rng(0).normal(size=(4, 101)).astype(np.float32) * 3
    for top_k, top_p in [(None, 0.9), (10, None), (20, 0.5), (None, 0.05)]:
        expected = torch.tensor(logits)
        if top_k is not None:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p is not None:
            expected = TopPLogitsWarper(top_p)(None, expected)
        np.testing.assert_array_equal(np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p)), expected.numpy())


def test_sampling_is_seeded_and_stays_in_the_top_k(lively_hf):
    directory, _ = lively_hf
    model, params = jlora.load_gpt2(directory)
    sample = lambda seed, **kw: generate(model, params, PROMPTS, max_new_tokens=12, seed=seed, **kw).tokens  # noqa: E731
    np.testing.assert_array_equal(sample(1, temperature=1.5, top_k=3), sample(1, temperature=1.5, top_k=3))
    assert not np.array_equal(sample(1, temperature=1.5, top_k=3), sample(2, temperature=1.5, top_k=3))
    greedy = sample(0)
    np.testing.assert_array_equal(sample(4, temperature=2.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(5, temperature=2.0, top_p=1e-6), greedy)

    tokens = sample(7, temperature=1.5, top_k=3)
    ids, mask = left_pad(PROMPTS)
    full = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    positions = np.maximum(full_mask.cumsum(1) - 1, 0)
    logits = np.asarray(model.apply({"params": params}, full, full_mask, positions))
    before = logits[:, ids.shape[1] - 1 : -1]  # the logits each new token was drawn from
    top3 = np.argsort(before, axis=-1)[..., -3:]
    assert (top3 == tokens[..., None]).any(-1).all()


def test_too_long_is_an_error(lively_hf):
    model, params = jlora.load_gpt2(lively_hf[0])
    with pytest.raises(ValueError, match=r"exceeds the model's 64 positions \(at most 4 new tokens fit\)"):
        generate(model, params, [[1] * 60], max_new_tokens=5)


def test_generate_command_on_a_checkpoint_and_a_peft_folder(tmp_path, capsys):
    from jlora.cli import main
    from jlora.core.decoding.generate import generate_text
    from jlora.exchange.peft import save_peft
    from jlora.training.data.tokenizer import load_tokenizer

    from ...conftest import save_byte_level_tokenizer

    base = tmp_path / "base"
    vocab = save_byte_level_tokenizer(base)
    make_hf_checkpoint(
        base, seed=2, initializer_range=0.4, vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2
    )
    cfg = jlora.LoraConfig(r=4, alpha=8)
    model, params = jlora.load_gpt2(base, lora=cfg)
    lora = map_factors(
        lambda x: 0.5 * jax.random.normal(jax.random.key(1), x.shape), jlora.init_lora(jax.random.key(0), model, params)
    )
    save_peft(tmp_path / "adapter", lora, cfg, base_model_name_or_path=None)
    prompts = ["The cat", "Once upon a time, there"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")

    texts, _ = generate_text(model, params, load_tokenizer(str(base)), prompts, lora=lora, max_new_tokens=6)
    options = ["--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "adapter"), "--base", str(base), *options]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(p + t + "\n" for p, t in zip(prompts, texts)) and "tokens/s" in err
    assert main(["generate", str(base), *options]) == 0
    assert capsys.readouterr().out != out  # the adapter changes the text

    assert main(["generate", str(tmp_path / "adapter"), *options]) == 2
    assert "names no base model; pass --base" in capsys.readouterr().err
    assert main(["generate", str(base), "--prompt", "x", "--max-new-tokens", "100"]) == 2
    assert "exceeds the model's 64 positions" in capsys.readouterr().err
