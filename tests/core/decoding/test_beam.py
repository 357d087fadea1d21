"""Beam search against transformers' `generate(num_beams=...)`, token for token, on each model family's tiny checkpoint.

A family is one entry of FAMILIES: how its tiny Hugging Face checkpoint is made, loaded into jlora and saved
back with an adapter merged, and which modules its adapters target. Another family joins by adding an entry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import jlora
from jlora.core.algebra.mixed import stack_adapters
from jlora.core.decoding.generate import _decoder, generate

from ...conftest import TINY, make_hf_checkpoint, make_llama_checkpoint

MAX_NEW = 12
# Four prompts of 5, 2, 9 and 13 tokens: one batch, left-padded to 16
PROMPTS = [[5, 17, 3, 88, 42], [70, 1], [9] * 8 + [2], [31, 4, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33]]


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family as these tests need it."""

    name: str
    make_checkpoint: Callable  # (directory, seed, initializer_range) -> the torch model, saved there
    load: Callable  # (directory) -> (model, params)
    save: Callable  # (directory, config, params) -> directory of a checkpoint transformers loads
    reference: type  # the transformers class that loads it
    targets: tuple[str, ...]  # the adapters' target modules


FAMILIES = [
    Family(
        "gpt2",
        lambda directory, seed, std: make_hf_checkpoint(directory, seed=seed, initializer_range=std, **TINY),
        jlora.load_gpt2,
        jlora.save_gpt2,
        GPT2LMHeadModel,
        ("c_attn", "c_fc"),
    ),
    Family(
        "llama",
        lambda directory, seed, std: make_llama_checkpoint(directory, "llama", seed=seed, initializer_range=std),
        jlora.load_model,
        jlora.save_model,
        LlamaForCausalLM,
        ("q_proj", "v_proj", "down_proj"),
    ),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def lively(family, tmp_path_factory):
    """(family, directory): a tiny checkpoint with large random weights, so that beams part ways."""
    directory = tmp_path_factory.mktemp(f"lively_{family.name}")
    family.make_checkpoint(directory, 5, 0.4)
    return family, directory


def random_adapter(model, params, cfg, seed):
    """An adapter (with its scale) whose A and B are random and large enough to change what is decoded."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(jlora.init_lora(jax.random.key(seed), cfg, params))
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    lively = lambda path, x, key: x if path[-1].key == "scaling" else 0.3 * jax.random.normal(key, x.shape)  # noqa: E731
    return treedef.unflatten([lively(path, x, key) for (path, x), key in zip(leaves, keys)])


@pytest.fixture(scope="module")
def merged(lively, tmp_path_factory):
    """(model, params, lora, the transformers model of the base with that adapter merged)."""
    family, directory = lively
    cfg = jlora.LoraConfig(r=4, alpha=8, target_modules=family.targets)
    model, params = family.load(directory)
    model = model.clone(lora=cfg)
    lora = random_adapter(model, params, cfg, 0)
    saved = family.save(tmp_path_factory.mktemp("merged") / "model", model.config, jlora.merge(params, lora))
    return model, params, lora, family.reference.from_pretrained(saved).eval()


def hf_generate(reference, prompts, eos, **options):
    """transformers' new tokens (B, <= MAX_NEW) and sequences_scores (B,) of a left-padded batch.

    The padding is end-of-text, as GPT-2 users pad: transformers counts the padding's n-grams too, and a
    running beam never holds end-of-text, so none of them can ban a token (jlora counts real tokens only).
    """
    length = max(map(len, prompts))
    ids = np.full((len(prompts), length), eos)
    mask = np.zeros((len(prompts), length), np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :], mask[i, length - len(prompt) :] = prompt, 1
    with torch.no_grad():
        out = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
            **options,
        )
    return out.sequences[:, length:].numpy(), out.sequences_scores.numpy()


def assert_equal_to_transformers(out, expected, eos):
    tokens, scores = expected
    np.testing.assert_array_equal(out.tokens[:, : tokens.shape[1]], tokens)
    assert (out.tokens[:, tokens.shape[1] :] == eos).all()  # what transformers leaves out is end-of-text
    np.testing.assert_allclose(out.scores, scores, rtol=1e-5)
    for row, n in zip(out.tokens, out.lengths, strict=True):
        assert row[n - 1] == eos or n == MAX_NEW
        assert eos not in row[: n - 1] and (row[n:] == eos).all()


@pytest.fixture(scope="module")
def eos(merged):
    """An end-of-text id that some beams make mid-way: a token of the best hypothesis, with no end-of-text."""
    model, params, lora, _ = merged
    free = generate(model, params, PROMPTS, lora=lora, max_new_tokens=MAX_NEW, num_beams=4)
    return int(free.tokens[0, 4])


def test_beam_search_with_a_merged_adapter_equals_transformers_generate(merged, eos):
    """The paper's settings, scaled down: 4 beams, length penalty 0.8, no repeated 4-gram."""
    model, params, lora, reference = merged
    options = dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=4)
    out = generate(model, params, PROMPTS, lora=lora, max_new_tokens=MAX_NEW, eos_token_id=eos, **options)
    assert_equal_to_transformers(out, hf_generate(reference, PROMPTS, eos, **options), eos)
    assert out.lengths.min() < MAX_NEW and (out.tokens == eos).any(axis=1).sum() >= 2  # hypotheses ended by eos
    assert len(set(out.lengths.tolist())) > 1
    greedy = generate(model, params, PROMPTS, lora=lora, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert not np.array_equal(greedy.tokens, out.tokens)  # the search finds what greedy does not
    assert out.compile_seconds > 0 and out.seconds > 0 and greedy.scores is None


@pytest.mark.parametrize(
    "options",
    [
        dict(early_stopping=True),
        dict(early_stopping=False, length_penalty=1.0),
        dict(early_stopping="never", length_penalty=1.5),
        dict(early_stopping="never", length_penalty=-0.5),
        dict(repetition_penalty=1.8, length_penalty=0.8),
        dict(repetition_penalty=0.7, no_repeat_ngram_size=2, early_stopping=True),
    ],
    ids=["early", "heuristic", "never-longer", "never-shorter", "repetition", "reward-repeats-no-bigram"],
)
def test_stop_rules_and_penalties_equal_transformers(merged, eos, options):
    model, params, lora, reference = merged
    out = generate(model, params, PROMPTS, lora=lora, max_new_tokens=MAX_NEW, eos_token_id=eos, num_beams=3, **options)
    assert_equal_to_transformers(out, hf_generate(reference, PROMPTS, eos, num_beams=3, **options), eos)


def test_the_settings_change_the_result(merged, eos):
    """The parametrized settings above do not all give one answer: each comparison could fail."""
    model, params, lora, _ = merged
    run = lambda **kw: generate(model, params, PROMPTS, lora=lora, max_new_tokens=MAX_NEW, eos_token_id=eos,  # noqa: E731
                                num_beams=3, **kw).tokens.tobytes()  # fmt: skip
    outputs = [
        run(early_stopping=True),
        run(),
        run(early_stopping="never", length_penalty=1.5),
        run(length_penalty=-0.5),
        run(repetition_penalty=1.8),
        run(no_repeat_ngram_size=2),
    ]
    assert len(set(outputs)) >= 4


def test_a_mixed_batch_beam_searches_each_row_with_its_own_adapter(lively):
    """Every beam of a row decodes with the row's adapter: row by row, what that adapter writes alone."""
    family, directory = lively
    model, params = family.load(directory)
    configs = [
        jlora.LoraConfig(r=4, alpha=8, target_modules=family.targets),
        jlora.LoraConfig(r=2, alpha=6, target_modules=family.targets[:1]),
    ]
    adapters = [random_adapter(model.clone(lora=c), params, c, 10 + k) for k, c in enumerate(configs)]
    prompts, index = PROMPTS + PROMPTS[:2], [0, 1, -1, 1, 1, 0]
    options = dict(max_new_tokens=MAX_NEW, num_beams=4, length_penalty=0.8, no_repeat_ngram_size=3)
    free = generate(model, params, prompts[:1], lora=adapters[0], **options)
    options["eos_token_id"] = int(free.tokens[0, 3])
    mixed = generate(model, params, prompts, adapters=stack_adapters(adapters), adapter_index=index, **options)
    assert len({row.tobytes() for row in mixed.tokens}) == len(prompts)  # every row its own answer
    assert mixed.lengths.min() < MAX_NEW
    for n, (prompt, k) in enumerate(zip(prompts, index, strict=True)):
        alone = generate(model, params, [prompt], lora=None if k < 0 else adapters[k], **options)
        np.testing.assert_array_equal(mixed.tokens[n], alone.tokens[0])
        assert mixed.lengths[n] == alone.lengths[0]
        np.testing.assert_allclose(mixed.scores[n], alone.scores[0], rtol=1e-5)


def test_settings_are_arguments_one_compilation_serves_them(merged, eos, caplog):
    """Length penalty, stop rule, penalty value, end-of-text and nearby prompt lengths reuse one program."""
    model, params, lora, _ = merged
    options = dict(lora=lora, max_new_tokens=MAX_NEW, num_beams=3, no_repeat_ngram_size=4, repetition_penalty=1.2)
    generate(model, params, PROMPTS, **options)
    misses = _decoder.cache_info().misses
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        outs = [
            generate(model, params, PROMPTS, **{**options, "length_penalty": 0.8, "early_stopping": True}),
            generate(model, params, PROMPTS, **{**options, "early_stopping": "never", "eos_token_id": eos}),
            generate(model, params, [[1] * 16, [2], [3, 4], [5]], **{**options, "repetition_penalty": 2.0}),
        ]
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert _decoder.cache_info().misses == misses and all(out.compile_seconds == 0.0 for out in outs)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_beams=2, temperature=0.7), "num_beams 2 searches, it does not sample: give temperature 0"),
        (dict(num_beams=0), "num_beams must be an integer >= 1, got 0"),
        (dict(num_beams=51), "num_beams 51: beam search keeps 2 x num_beams candidates of the model's 101 tokens"),
        (dict(num_beams=2, early_stopping="always"), "early_stopping must be True, False or 'never'"),
        (dict(num_beams=2, no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
        (dict(temperature=1.0, top_p=float("nan")), r"top_p must be a finite number in \(0, 1\], got nan"),
        (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    ],
)
def test_bad_settings_are_refused(merged, options, message):
    model, params, lora, _ = merged
    with pytest.raises(ValueError, match=message):
        generate(model, params, PROMPTS, lora=lora, **options)
