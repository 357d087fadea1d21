"""What every decoder family shares: causal attention, the KV cache's masks, and token-id checks.

A model family (`jlora.core.models.gpt2`, `jlora.core.models.llama`) computes its queries, keys
and values its own way; from there the attention is one function here, for training and
scoring (`causal_attention`: causal, with a key mask for padding or packed segments) and for
decoding through a fixed-size KV cache (`cached_attention`)::

    cache = {"index": () int32,          # slots filled so far (the same for every row)
             "mask":  (B, T_max) bool,   # which filled slots hold real tokens (left padding: False)
             "<blocks>": {"0": {"k": (B, T_max, K, Dh), "v": (B, T_max, K, Dh)}, ...}}

`decode_positions` turns the cache and the new tokens into their positions (real tokens before
them, as transformers counts them for left-padded prompts) and the (B, 1, T, T_max) mask. Keys and
values may have fewer heads than the queries (K divides H: grouped-query attention), which
`jax.nn.dot_product_attention` takes as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import DataError


def fused_attention_eligible(dtype, masked: bool, backend: str) -> bool:
    """Whether ``attention=None`` asks for cuDNN's fused kernel: on a GPU, in half precision, and
    without an explicit mask (which JAX's cuDNN path cannot take: packed rows use plain XLA)."""
    return backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not masked


def causal_attention(q, k, v, mask: jax.Array | None, scale: float, implementation: str | None) -> jax.Array:
    """Causal `jax.nn.dot_product_attention` of q (B, T, H, Dh), k, v (B, T, K, Dh); `mask` (B, 1, T or 1, T)
    or None.

    `implementation` None chooses: the fused cuDNN kernel where `fused_attention_eligible` (JAX's
    own None always means XLA), falling back to XLA if this GPU or cuDNN refuses it at trace time.
    """
    if implementation is None:
        implementation = "xla"
        if fused_attention_eligible(q.dtype, mask is not None, jax.default_backend()):
            try:
                return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError, TypeError):
                pass  # an unsupported GPU, cuDNN version or shape: plain XLA below
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation=implementation)


def cached_attention(q, k, v, kv: dict, index, mask: jax.Array, scale: float) -> tuple[jax.Array, dict]:
    """Attention of T new queries over the cache: k, v (B, T, K, Dh) written at slots index .. index+T-1
    of ``kv = {"k", "v"}`` (B, T_max, K, Dh); `mask` (B, 1, T, T_max) from `decode_positions`.

    Returns (out (B, T, H, Dh), the new {"k", "v"}). The fused kernels take no arbitrary mask (left
    padding, an offset query block): plain XLA.
    """
    k, v = (
        jax.lax.dynamic_update_slice(kv[n], t.astype(kv[n].dtype), (0, index, 0, 0)) for n, t in (("k", k), ("v", v))
    )
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale, implementation="xla"
    )
    return out, {"k": k, "v": v}


def decode_positions(cache: dict, input_ids: jax.Array, attention_mask: jax.Array | None):
    """(position ids (B, T), attention mask (B, 1, T, T_max), the cache's new key mask (B, T_max)) of T new
    tokens: a token's position is the number of real tokens before it, so left-padded prompts decode as
    they would alone."""
    batch, length = input_ids.shape
    index = cache["index"]
    new = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
    key_mask = jax.lax.dynamic_update_slice(cache["mask"], new, (0, index))  # (B, T_max)
    counts = jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1
    position_ids = jnp.maximum(jax.lax.dynamic_slice_in_dim(counts, index, length, axis=1), 0)
    slots = jnp.arange(key_mask.shape[1])
    query_slots = index + jnp.arange(length)[:, None]
    causal = slots <= query_slots  # (T, T_max)
    # A padding query sees at least itself, so no softmax row is empty (its output is unused).
    mask = (key_mask[:, None, None, :] & causal) | (slots == query_slots)  # (B, 1, T, T_max)
    return position_ids, mask, key_mask


def training_mask(attention_mask: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array | None:
    """The key mask of a training or scoring batch, (B, 1, 1 or T, T) bool or None: padding keys off
    (`attention_mask` (B, T)), and with `segment_ids` (B, T) each token seeing its own segment only."""
    mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, T, T)
        mask = same if mask is None else mask & same
    return mask


def empty_cache(blocks: str, n_layer: int, batch: int, max_length: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """An empty KV cache (module doc) for `batch` rows of up to `max_length` tokens; a buffer per leaf, so a
    caller may donate the cache to a jitted step."""
    zeros = lambda: jnp.zeros((batch, max_length, kv_heads, head_dim), dtype)  # noqa: E731
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch, max_length), bool),
        blocks: {str(i): {"k": zeros(), "v": zeros()} for i in range(n_layer)},
    }


def check_token_ids(input_ids: jax.Array, vocab_size: int) -> None:
    """Refuse token ids outside 0 .. vocab_size - 1, when they are concrete (outside jit).

    Under jit the ids are not known, and JAX's gather does not raise: an id >= vocab_size reads
    a NaN embedding row, which makes the logits of its whole row NaN (masked attention multiplies
    the NaN values by zero weights), and an id in -vocab_size .. -1 wraps around as in numpy.
    A train step's non-finite loss check then stops the run. Check ids before jitted calls.
    """
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.max() if ids.max() >= vocab_size else ids.min()
        raise DataError(f"token id {int(bad)} is outside the model's vocabulary 0..{vocab_size - 1}")
