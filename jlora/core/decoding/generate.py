"""Batched text generation with a fixed-size KV cache, in one compiled loop.

::

    prompts, left-padded to P ──prefill──> cache slots 0..P-1, logits of each last prompt token
      └── while some row is unfinished and fewer than max_new_tokens were made:
              token = pick(logits)                  greedy, or temperature -> top-k -> top-p sampling
              logits, cache = model(token, cache)   one more slot of the (B, P + max_new_tokens) cache

With ``num_beams=K`` > 1 the loop is `jlora.core.decoding.beam`'s: K beams a prompt, the cache's rows
B x K, reordered by gathering them, each prompt's best hypothesis returned (transformers'
``generate(num_beams=K)``, token for token). ``no_repeat_ngram_size`` and ``repetition_penalty``
(`jlora.core.decoding.processors`) act in every mode, on the logits or, in beam search, the
log-probabilities, as transformers' processors do.

One adapter (``lora=``) is merged into the weights first (`jlora.core.lora.merge`), so decoding pays
nothing for LoRA. Several (``adapters=`` an `jlora.core.algebra.mixed.AdapterStack`, ``adapter_index=``
one per prompt) decode as one mixed batch: the base once per row, each row's own adapter on top (every
beam of a row its row's). Prefill and loop are one compiled function of fixed shapes whose arguments
are the weights (and the stack and index): it compiles once per batch size, padded prompt length,
``max_new_tokens``, mode (greedy, sampling, or the number of beams; the n-gram size; the repetition
penalty on or off) and weight shapes, never per token nor per adapter (prompt lengths are padded up to
a multiple of 16 so that nearby lengths share it). A row stops at
``eos_token_id`` and is padded with it afterwards, as transformers' ``generate`` does.
Temperature, top-k, top-p, the seed, end-of-text, the length penalty, the stop rule and the penalty's
value are arguments of the compiled function, not constants in it, so changing them does not recompile
either. The model is reached in two places only, `_prefill` and `_next_logits`::

    model, params = jlora.load_gpt2("gpt2")
    out = generate(model, params, [[15496, 11], [40]], max_new_tokens=20, eos_token_id=50256)
    out.tokens, out.lengths, out.tokens_per_s
    out = generate(model, params, [[15496, 11], [40]], num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4)
    stack = stack_adapters([lora_a, lora_b])                           # jlora.core.algebra.mixed
    out = generate(model, params, [[15496, 11], [40]], adapters=stack, adapter_index=[1, 0])
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.checks import check_number
from jlora.core.algebra.mixed import AdapterStack, check_index, mixed_variables
from jlora.core.decoding.beam import beam_search
from jlora.core.decoding.beam import settings as beam_settings
from jlora.core.decoding.processors import ban_repeated_ngrams, penalize_repeats
from jlora.core.lora.merge import merge
from jlora.core.models.decoder import check_token_ids
from jlora.errors import ConfigError, JloraError

PAD_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` made.

    Attributes:
      tokens: (B, max_new_tokens) new token ids; after a row's end-of-text, end-of-text again.
      lengths: (B,) new tokens per row, up to and including end-of-text.
      eos_token_id: the end-of-text id (None: rows ran to max_new_tokens).
      seconds: wall time of prefill and decoding (compilation excluded).
      compile_seconds: time spent compiling (0.0 when the function was already compiled).
      scores: (B,) float32, beam search's score of each row's hypothesis (transformers' ``sequences_scores``:
        the sum of its processed log-probabilities / length ** length_penalty); None for greedy and sampling.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    eos_token_id: int | None
    seconds: float
    compile_seconds: float
    scores: np.ndarray | None = None

    @property
    def tokens_per_s(self) -> float:
        """New tokens (end-of-text included, padding not) per second of decoding."""
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)

    def sequences(self) -> list[list[int]]:
        """Each row's new tokens, without end-of-text and what follows it."""
        out = []
        for row, n in zip(self.tokens, self.lengths, strict=True):
            row = [int(t) for t in row[:n]]
            out.append(row[:-1] if row and row[-1] == self.eos_token_id else row)
        return out


def filter_logits(logits: jax.Array, top_k: int | jax.Array | None = None, top_p: float | jax.Array | None = None):
    """Set to -inf every logit outside the top `top_k`, then outside the top-`top_p` probability mass.

    transformers' TopK / TopP warpers, in the same order: top-p keeps the smallest set of the
    most likely tokens whose probabilities sum to more than `top_p` (always at least one).
    Both may be traced values (top_k >= vocabulary size or top_p = 1 filter nothing).

    >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), top_p=0.75).tolist()[2:]
    [-inf, -inf]
    """
    if top_k is not None:
        descending = -jnp.sort(-logits, axis=-1)
        kth = jnp.take(descending, jnp.minimum(top_k, logits.shape[-1]) - 1, axis=-1)[..., None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ascending = jnp.sort(logits, axis=-1)
        mass_below = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        dropped = (mass_below <= 1 - top_p).at[..., -1].set(False)
        # The cut-off is the smallest logit kept; `dropped` is a prefix of the ascending order.
        cutoff = jnp.min(jnp.where(dropped, jnp.inf, ascending), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _variables(params, rows, repeat: int = 1) -> dict:
    """The model's variables: the (merged) base, or a mixed batch's with each row's index repeated `repeat` times."""
    if rows is None:
        return {"params": params}
    return mixed_variables(params, AdapterStack(rows[0]), jnp.repeat(rows[1], repeat))


def _prefill(model, variables, ids, mask, max_new_tokens):
    """(logits (B, V) float32 after each prompt, the cache of B rows with room for max_new_tokens more)."""
    cache = model.init_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    hidden, cache = model.apply(variables, ids, cache, mask, method="decode")
    return model.apply(variables, hidden[:, -1], method="logits").astype(jnp.float32), cache


def _next_logits(model, variables, token, cache):
    """(logits (R, V) float32, cache) after one more token (R,) per row."""
    hidden, cache = model.apply(variables, token[:, None], cache, method="decode")
    return model.apply(variables, hidden[:, -1], method="logits").astype(jnp.float32), cache


def _process(scores, ids, mask, tokens, step, options, *, no_repeat_ngram_size, penalize):
    """Greedy and sampled decoding's scores (the logits) through the repetition processors; the row so far is
    the prompt (B, P) then `tokens` (B, N) up to `step`."""
    if not (penalize or no_repeat_ngram_size):
        return scores
    seq = jnp.concatenate([ids, tokens], axis=1)
    made = jnp.broadcast_to(jnp.arange(tokens.shape[1]) < step, tokens.shape)
    real = jnp.concatenate([mask.astype(bool), made], axis=1)
    if penalize:
        scores = penalize_repeats(scores, seq, real, options.repetition_penalty)
    if no_repeat_ngram_size:
        scores = ban_repeated_ngrams(scores, seq, real, ids.shape[1] + step, no_repeat_ngram_size)
    return scores


def _decode(model, params, rows, ids, mask, key, sampling, options, eos, *, max_new_tokens, mode):
    """Prefill and the decoding loop. `rows`: None, or (stacked adapters, adapter index) of a mixed batch;
    `sampling`: (temperature, top_k, top_p); `options`: `BeamSettings`; `eos`: -1 when rows never stop;
    `mode`: a `Mode`. Greedy and sampling return (tokens, steps); beam search (tokens, lengths, scores)."""
    batch = ids.shape[0]
    logits, cache = _prefill(model, _variables(params, rows), ids, mask, max_new_tokens)
    processors = dict(no_repeat_ngram_size=mode.no_repeat_ngram_size, penalize=mode.penalize)
    if mode.num_beams > 1:
        variables = _variables(params, rows, repeat=mode.num_beams)
        next_logits = functools.partial(_next_logits, model, variables)
        shape = dict(num_beams=mode.num_beams, max_new_tokens=max_new_tokens, **processors)
        return beam_search(next_logits, logits, cache, ids, mask, options, eos, **shape)
    variables = _variables(params, rows)

    def pick(logits, key):
        if mode.greedy:
            return jnp.argmax(logits, axis=-1)
        temperature, top_k, top_p = sampling
        logits = filter_logits(logits / temperature, top_k, top_p)
        return jax.random.categorical(key, logits, axis=-1)

    def more(state):
        step, _, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(state):
        step, key, logits, cache, tokens, done = state
        key, sample_key = jax.random.split(key)
        logits = _process(logits, ids, mask, tokens, step, options, **processors)
        token = jnp.where(done, eos, pick(logits, sample_key)).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        logits, cache = _next_logits(model, variables, token, cache)
        return step + 1, key, logits, cache, tokens, done | (token == eos)

    tokens = jnp.full((batch, max_new_tokens), jnp.maximum(eos, 0), jnp.int32)
    state = (0, key, logits, cache, tokens, jnp.zeros(batch, bool))
    step, *_, tokens, _ = jax.lax.while_loop(more, one_token, state)
    return tokens, step


class Mode(NamedTuple):
    """What shapes the compiled loop (each distinct mode compiles once): greedy or sampled (one beam), or
    `num_beams` beams; the n-gram size; whether the repetition penalty is applied."""

    greedy: bool = True
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    penalize: bool = False


@functools.lru_cache(maxsize=8)
def _decoder(model, structure, leaves: tuple, max_new_tokens: int, mode: Mode):
    """`_decode` compiled for one model, weight and prompt shape, length and mode (the 8 latest are kept)."""
    params, rows, ids = jax.tree.unflatten(structure, leaves)
    decode = functools.partial(_decode, model, max_new_tokens=max_new_tokens, mode=mode)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    sampling = (scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))
    options = jax.eval_shape(lambda: beam_settings(max_new_tokens, 1.0, False, 1.0))
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.jit(decode).lower(params, rows, ids, ids, key, sampling, options, scalar(jnp.int32)).compile()


def _left_pad(prompts: Sequence[Sequence[int]], max_new_tokens: int, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > n_positions:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's {n_positions} positions"
            f" (at most {max(n_positions - longest, 0)} new tokens fit)"
        )
    length = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, n_positions - max_new_tokens)
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, -len(prompt) :], mask[row, -len(prompt) :] = prompt, 1
    return ids, mask


def generate(
    model,
    params: Mapping,
    prompts: Sequence[Sequence[int]],
    *,
    lora: Mapping | None = None,
    adapters: AdapterStack | None = None,
    adapter_index: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
      model: the GPT-2 module.
      params: the base parameter tree.
      prompts: token ids per row (lengths may differ: rows are left-padded).
      lora: an adapter tree (each adapter with its scale), merged into `params` before decoding (None:
        `params` as they are).
      adapters: instead, K adapters stacked (`jlora.core.algebra.mixed.stack_adapters`), not merged: row n
        decodes with adapter ``adapter_index[n]`` (-1: the base alone), all rows in one batch.
      adapter_index: one adapter index per prompt, with `adapters`.
      max_new_tokens: the most tokens made per row.
      eos_token_id: a row stops after making it (None: never).
      temperature: 0 for greedy decoding (argmax), else the softmax temperature for sampling.
      top_k, top_p: sampling filters (None: off); ignored when greedy.
      seed: the sampling RNG seed.
      num_beams: > 1 for beam search (`jlora.core.decoding.beam`, transformers' ``_beam_search``); not
        with sampling. Every beam of a row decodes with the row's adapter.
      length_penalty: beam search's hypotheses score (sum of log-probabilities) / new_tokens ** length_penalty.
      early_stopping: beam search's stop rule: True, False or "never", as transformers' (see `beam`).
      no_repeat_ngram_size: n > 0: no n-gram of a row's real tokens (prompt and new) made twice.
      repetition_penalty: > 0; 1 is off. The scores of tokens a row holds are multiplied by it where negative,
        divided where positive: the log-probabilities in beam search, the logits otherwise (as transformers).

    Returns:
      A `Generation` (tokens, lengths, timing; with beams, each prompt's best hypothesis and its score).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    check_decoding(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty,
        vocab=vocab,
    )
    if (adapters is None) != (adapter_index is None) or (adapters is not None and lora is not None):
        raise ValueError("give lora= (one adapter, merged), or adapters= with adapter_index= (a mixed batch)")
    mode = Mode(temperature == 0, num_beams, no_repeat_ngram_size, repetition_penalty != 1.0)
    rows = None
    if adapters is not None:
        rows = (adapters.lora, check_index(adapter_index, adapters.size, len(prompts)))
    elif lora is not None:
        params = merge(params, lora)
    model = model.clone(lora=None)  # decoding has no dropout; the adapters carry their scales
    ids, mask = _left_pad(prompts, max_new_tokens, model.config.n_positions)
    check_token_ids(ids, model.config.vocab_size)  # the decoding loop is jitted: it could not tell
    sampling = (jnp.float32(temperature or 1.0), jnp.int32(min(top_k or vocab, vocab)), jnp.float32(top_p or 1.0))
    options = beam_settings(max_new_tokens, length_penalty, early_stopping, repetition_penalty)
    eos = jnp.int32(-1 if eos_token_id is None else eos_token_id)
    args = (params, rows, ids, mask, jax.random.key(seed), sampling, options, eos)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), args[:3])
    hits = _decoder.cache_info().hits
    start = time.perf_counter()
    decode = _decoder(model, jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract)), max_new_tokens, mode)
    compile_seconds = 0.0 if _decoder.cache_info().hits > hits else time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(decode(*args))
    seconds = time.perf_counter() - start
    if num_beams > 1:
        tokens, lengths, scores = map(np.asarray, out)
        return Generation(tokens, lengths, eos_token_id, seconds, compile_seconds, scores)
    tokens, steps = np.asarray(out[0]), int(out[1])
    lengths = np.full(len(prompts), steps)
    if eos_token_id is not None:
        hit = tokens == eos_token_id
        lengths = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, lengths)
    return Generation(tokens, lengths, eos_token_id, seconds, compile_seconds)


def check_decoding(
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    vocab: int | None = None,
    name: Callable[[str], str] = str,
    error: type[JloraError] = ConfigError,
) -> None:
    """The decoding options' kinds and ranges, checked in one place for `generate`, the command line and the
    scripts; refuses what transformers' ``generate`` would refuse (and beam sampling, which jlora does not do).

    `name` spells an option in the message (the command line passes its flags: ``--top-p``); `vocab`, once
    the model is known, bounds the beams (2 x num_beams candidates of the vocabulary).

    >>> check_decoding(temperature=float("inf"), name=lambda n: "--" + n.replace("_", "-"))
    Traceback (most recent call last):
    jlora.errors.ConfigError: --temperature must be a finite number >= 0, got inf
    """
    number = functools.partial(check_number, error=error)
    if max_new_tokens is not None:
        number(name("max_new_tokens"), max_new_tokens, ">= 1", integer=True)
    number(name("temperature"), temperature, ">= 0")
    if top_k is not None:
        number(name("top_k"), top_k, ">= 1", integer=True)
    if top_p is not None:
        number(name("top_p"), top_p, "in (0, 1]")
    number(name("seed"), seed, integer=True)
    number(name("num_beams"), num_beams, ">= 1", integer=True)
    if vocab is not None and 2 * num_beams > vocab:
        raise error(
            f"{name('num_beams')} {num_beams}: beam search keeps 2 x num_beams candidates of the model's "
            f"{vocab} tokens (at most {vocab // 2} beams)"
        )
    if num_beams > 1 and temperature != 0:
        raise error(
            f"{name('num_beams')} {num_beams} searches, it does not sample: give {name('temperature')} 0 with it "
            f"(got {temperature!r})"
        )
    number(name("length_penalty"), length_penalty)
    number(name("no_repeat_ngram_size"), no_repeat_ngram_size, ">= 0", integer=True)
    number(name("repetition_penalty"), repetition_penalty, "> 0")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise error(f"{name('early_stopping')} must be True, False or 'never', got {early_stopping!r}")


def generate_text(
    model, params: Mapping, tokenizer: Any, prompts: Sequence[str], **options
) -> tuple[list[str], Generation]:
    """`generate` on text: encodes `prompts`, stops at the tokenizer's end-of-text, decodes the continuations."""
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    out = generate(model, params, [tokenizer.encode(p) for p in prompts], **options)
    return [tokenizer.decode(row) for row in out.sequences()], out
