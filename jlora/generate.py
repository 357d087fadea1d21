"""Batched text generation with a fixed-size KV cache, in one compiled loop.

::

    prompts, left-padded to P ──prefill──> cache slots 0..P-1, logits of each last prompt token
      └── while some row is unfinished and fewer than max_new_tokens were made:
              token = pick(logits)                  greedy, or temperature -> top-k -> top-p sampling
              logits, cache = model(token, cache)   one more slot of the (B, P + max_new_tokens) cache

The adapter is merged into the weights first (`jlora.merge`), so decoding pays nothing for
LoRA. Prefill and loop are one compiled function of fixed shapes: it compiles once per batch
size, padded prompt length, ``max_new_tokens`` and sampling mode, never per token (prompt
lengths are padded up to a multiple of 16 so that nearby lengths share it). A row stops at
``eos_token_id`` and is padded with it afterwards, as transformers' ``generate`` does.
Temperature, top-k, top-p, the seed and end-of-text are arguments of the compiled function,
not constants in it, so changing them does not recompile either::

    model, params = jlora.load_gpt2("gpt2")
    out = generate(model, params, [[15496, 11], [40]], max_new_tokens=20, eos_token_id=50256)
    out.tokens, out.lengths, out.tokens_per_s
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.gpt2 import GPT2, init_cache
from jlora.merge import merge

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
    """

    tokens: np.ndarray
    lengths: np.ndarray
    eos_token_id: int | None
    seconds: float
    compile_seconds: float

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


def _decode(model, params, ids, mask, key, sampling, eos, *, max_new_tokens, greedy):
    """Prefill and the decoding loop. `sampling`: (temperature, top_k, top_p); `eos`: -1 when rows never stop."""
    batch, prompt_length = ids.shape
    variables = {"params": params}
    last_logits = lambda hidden: model.apply(variables, hidden[:, -1], method=GPT2.logits).astype(jnp.float32)  # noqa: E731
    cache = init_cache(model.config, batch, prompt_length + max_new_tokens)
    hidden, cache = model.apply(variables, ids, mask, cache=cache, method=GPT2.hidden)

    def pick(logits, key):
        if greedy:
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
        token = jnp.where(done, eos, pick(logits, sample_key)).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        hidden, cache = model.apply(variables, token[:, None], cache=cache, method=GPT2.hidden)
        return step + 1, key, last_logits(hidden), cache, tokens, done | (token == eos)

    tokens = jnp.full((batch, max_new_tokens), jnp.maximum(eos, 0), jnp.int32)
    state = (0, key, last_logits(hidden), cache, tokens, jnp.zeros(batch, bool))
    step, *_, tokens, _ = jax.lax.while_loop(more, one_token, state)
    return tokens, step


_compiled: dict[Any, Any] = {}  # (model, shapes, max_new_tokens, greedy) -> compiled _decode


def _left_pad(prompts: Sequence[Sequence[int]], max_new_tokens: int, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > n_positions:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's {n_positions} positions"
        )
    length = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, n_positions - max_new_tokens)
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, -len(prompt) :], mask[row, -len(prompt) :] = prompt, 1
    return ids, mask


def generate(
    model: GPT2,
    params: Mapping,
    prompts: Sequence[Sequence[int]],
    *,
    lora: Mapping | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
      model: the GPT-2 module; with `lora`, its ``model.lora`` config gives the scalings.
      params: the base parameter tree.
      prompts: token ids per row (lengths may differ: rows are left-padded).
      lora: an adapter tree, merged into `params` before decoding (None: `params` as they are).
      max_new_tokens: the most tokens made per row.
      eos_token_id: a row stops after making it (None: never).
      temperature: 0 for greedy decoding (argmax), else the softmax temperature for sampling.
      top_k, top_p: sampling filters (None: off); ignored when greedy.
      seed: the sampling RNG seed.

    Returns:
      A `Generation` (tokens, lengths, timing).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if lora is not None:
        params = merge(params, lora, model.lora)
    model = model.clone(lora=None)
    ids, mask = _left_pad(prompts, max_new_tokens, model.config.n_positions)
    greedy = temperature == 0
    vocab = model.config.vocab_size
    sampling = (jnp.float32(temperature or 1.0), jnp.int32(min(top_k or vocab, vocab)), jnp.float32(top_p or 1.0))
    eos = jnp.int32(-1 if eos_token_id is None else eos_token_id)
    args = (params, ids, mask, jax.random.key(seed), sampling, eos)
    shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(params))
    signature = (model, ids.shape, jax.tree.structure(params), shapes, max_new_tokens, greedy)
    compile_seconds = 0.0
    if signature not in _compiled:
        start = time.perf_counter()
        decode = functools.partial(_decode, model, max_new_tokens=max_new_tokens, greedy=greedy)
        _compiled[signature] = jax.jit(decode).lower(*args).compile()
        compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens, steps = jax.block_until_ready(_compiled[signature](*args))
    seconds = time.perf_counter() - start
    tokens = np.asarray(tokens)
    lengths = np.full(len(prompts), int(steps))
    if eos_token_id is not None:
        hit = tokens == eos_token_id
        lengths = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, lengths)
    return Generation(tokens, lengths, eos_token_id, seconds, compile_seconds)


def generate_text(
    model: GPT2, params: Mapping, tokenizer: Any, prompts: Sequence[str], **options
) -> tuple[list[str], Generation]:
    """`generate` on text: encodes `prompts`, stops at the tokenizer's end-of-text, decodes the continuations."""
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    out = generate(model, params, [tokenizer.encode(p) for p in prompts], **options)
    return [tokenizer.decode(row) for row in out.sequences()], out


def load_source(source: str, *, base: str | None = None, tokenizer: str | None = None) -> tuple:
    """(model, params, lora, tokenizer) from a run directory, a PEFT folder or a Hugging Face checkpoint.

    A PEFT folder needs its base: `base`, or the ``base_model_name_or_path`` it records.
    `tokenizer` overrides the source's own (a checkpoint directory, a Hub id or "bytes").
    """
    from pathlib import Path

    from jlora.hf_checkpoint import CheckpointError, load_gpt2
    from jlora.peft import ADAPTER_CONFIG, load_peft, read_adapter_config, with_base_leaves
    from jlora.tokenizer import load_tokenizer

    path = Path(source).expanduser()
    if (path / "config.yaml").exists() and (path / "checkpoints").is_dir():
        from jlora.checkpoint import load_run

        model, params, lora, _, meta = load_run(path)
        return model, params, lora, load_tokenizer(tokenizer or meta["tokenizer"])
    if (path / ADAPTER_CONFIG).exists():
        base = base or read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{path / ADAPTER_CONFIG} names no base model; pass --base")
        cfg, lora, leaves = load_peft(path)
        model, params = load_gpt2(base, lora=cfg)
        return model, with_base_leaves(params, leaves), lora, load_tokenizer(tokenizer or base)
    model, params = load_gpt2(source)
    return model, params, None, load_tokenizer(tokenizer or source)


def generate_command(args: Any) -> int:
    """``jlora generate SOURCE --prompt TEXT | --prompts FILE [options]``: continuations on stdout, speed on stderr."""
    import sys
    from pathlib import Path

    from jlora.cli import UsageError
    from jlora.tokenizer import TokenizerError

    prompts = list(args.prompt or [])
    if args.prompts:
        file = Path(args.prompts)
        if not file.exists():
            raise UsageError(f"--prompts: no such file {file}")
        prompts += [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompts FILE (one prompt per line)")
    try:
        model, params, lora, tokenizer = load_source(args.source, base=args.base, tokenizer=args.tokenizer)
        encoded = [tokenizer.encode(p) for p in prompts]
    except TokenizerError as e:
        raise UsageError(f"{e} (pass --tokenizer)") from e
    if any(not ids for ids in encoded):
        raise UsageError("a prompt encodes to no tokens")
    if max(max(ids) for ids in encoded) >= model.config.vocab_size:
        raise UsageError(
            f"the tokenizer's ids exceed the model's vocabulary ({model.config.vocab_size}); pass --tokenizer"
        )
    try:
        out = generate(
            model,
            params,
            encoded,
            lora=lora,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as e:  # lengths and sampling options
        raise UsageError(str(e)) from e
    for prompt, row in zip(prompts, out.sequences(), strict=True):
        print(prompt + tokenizer.decode(row))
    print(
        f"{int(out.lengths.sum())} tokens in {out.seconds:.2f} s: {out.tokens_per_s:.1f} tokens/s "
        f"(batch {len(prompts)}; compiling took {out.compile_seconds:.1f} s)",
        file=sys.stderr,
    )
    return 0
