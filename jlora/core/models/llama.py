"""Llama-architecture decoders in Flax linen (Llama 2 / 3, SmolLM2, Qwen2, Mistral), adapters read from "lora".

The parameter tree is the Hugging Face checkpoint's without its ``model.`` prefix, linear weights
stored (d_in, d_out) like every jlora kernel (transposed once, on load, from PyTorch's (out, in)),
so a module's path names its weight, its adapter and its PEFT target alike::

    params: embed_tokens/embedding (V, D)        norm/scale (D,)        lm_head/embedding (V, D)  (untied only)
            layers/{i}/input_layernorm/scale, post_attention_layernorm/scale          (D,)
            layers/{i}/self_attn/q_proj, k_proj, v_proj, o_proj /{kernel (d_in, d_out)[, bias]}
            layers/{i}/mlp/gate_proj, up_proj, down_proj        /{kernel (d_in, d_out)[, bias]}

A block is pre-RMSNorm attention and a SwiGLU MLP, ``down(silu(gate(x)) * up(x))``; queries and
keys are rotated (`jlora.core.models.rotary`: ``rope_theta``, ``rope_scaling`` "linear" or
"llama3"); keys and values have ``num_key_value_heads`` heads (grouped-query attention). Qwen2 is
this model with q/k/v biases; Mistral with a sliding window, which only matters past
``sliding_window`` tokens (`LlamaConfig` refuses runs that long rather than ignore it). Every
linear layer is the shared adapted `jlora.core.models.linear.Linear`, so LoRA, DoRA, slices of
nothing (no fused projection here), populations and mixed batches work as on GPT-2::

    model.apply({"params": params, "lora": lora}, ids)   # logits (B, T, V)

Decoding is `Llama.decode` through an explicit KV cache (`jlora.core.models.decoder`), the same
contract as `GPT2.decode`.

>>> import jax, jax.numpy as jnp
>>> config = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
...                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
>>> params = init_params(jax.random.key(0), config)
>>> sorted(params["layers"]["0"]["self_attn"]), params["layers"]["0"]["self_attn"]["k_proj"]["kernel"].shape
(['k_proj', 'o_proj', 'q_proj', 'v_proj'], (8, 4))
>>> Llama(config).apply({"params": params}, jnp.zeros((1, 3), jnp.int32)).shape
(1, 3, 11)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from jlora.core.lora.config import LoraConfig
from jlora.core.models.decoder import (
    cached_attention,
    causal_attention,
    check_token_ids,
    decode_positions,
    empty_cache,
    training_mask,
)
from jlora.core.models.linear import Linear, normal
from jlora.core.models.rotary import inv_frequencies, rotate
from jlora.errors import ConfigError
from jlora.tree import dotted

MODEL_TYPES = ("llama", "qwen2", "mistral")  # Hugging Face's model_type values this file reads
BLOCKS = "layers"  # the blocks' node in the parameter tree
MODULES = (  # the linear modules of a block, in a block's order: what LoRA can adapt
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# base modules PEFT's modules_to_save can hold whole (by last name): their leaves
SAVABLE = {"input_layernorm": ("scale",), "post_attention_layernorm": ("scale",), "norm": ("scale",)}
NUMERICS = ("dtype", "param_dtype", "attention", "remat")  # jlora's options, not the checkpoint's
_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family config (Hugging Face names) plus jlora's numerics options.

    `model_type` says which of the family: "llama" (biases where ``attention_bias`` / ``mlp_bias``
    say), "qwen2" (q/k/v biases), "mistral" (a sliding window of ``sliding_window`` tokens).
    `dtype`, `param_dtype`, `attention`, `remat`: as `jlora.GPT2Config`'s.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    model_type: str = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str | None = None
    remat: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in _INTS:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"LlamaConfig.{name} must be an integer > 0, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a Llama-family model; valid: {MODEL_TYPES}")
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
                )
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.hidden_act != "silu":
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; the Llama family here uses silu")
        if self.rope_scaling is not None:
            inv_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # refuses unknown kinds
            set_("rope_scaling", FrozenDict(self.rope_scaling))  # hashable: the config is a jit static argument
        for name in ("dtype", "param_dtype"):
            value = jnp.dtype(getattr(self, name)).name
            if value not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {value!r}")
            set_(name, value)

    # the names the rest of jlora reads of any model's config
    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    def check_length(self, seq_len: int) -> None:
        """Refuse rows longer than the positions, or than Mistral's sliding window (which is not computed)."""
        if seq_len > self.max_position_embeddings:
            raise ConfigError(f"seq_len={seq_len} is longer than the model's {self.max_position_embeddings} positions")
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise ConfigError(
                f"seq_len={seq_len} is longer than the model's sliding_window={self.sliding_window}, which jlora "
                "does not compute; use seq_len <= the window"
            )

    @classmethod
    def from_hf(cls, hf: Mapping, **overrides) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (unknown keys are ignored; transformers 5's
        ``rope_parameters`` read as rope_theta and rope_scaling)."""
        values = dict(hf)
        rope = values.get("rope_parameters")
        if isinstance(rope, Mapping):
            values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            kind = rope.get("rope_type", "default")
            if kind != "default":
                values.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if values.get("model_type") == "qwen2" and not values.get("use_sliding_window"):
            values["sliding_window"] = None  # Qwen2 records a window it does not use unless asked
        names = {f.name for f in dataclasses.fields(cls)} - set(NUMERICS)
        return cls(**{k: v for k, v in values.items() if k in names and v is not None}, **overrides)

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` fields (without jlora's numerics options)."""
        keep = {f.name for f in dataclasses.fields(self)} - set(NUMERICS)
        hf = {k: getattr(self, k) for k in keep}
        hf["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        if self.model_type == "qwen2":
            for key in ("attention_bias", "mlp_bias", "head_dim"):
                hf.pop(key)
        return {"architectures": [arch[self.model_type]], **hf}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32 and returned in the compute dtype."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class _Layer(nn.Module):
    config: LlamaConfig
    lora: LoraConfig | None = None

    def linear(self, features: int, name: str, bias: bool = False) -> Linear:
        c = self.config
        dropout = 0.0 if self.lora is None else self.lora.dropout
        dtypes = (jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        return Linear(features, *dtypes, c.initializer_range, use_bias=bias, lora_dropout=dropout, name=name)

    def norm(self, name: str) -> RMSNorm:
        c = self.config
        return RMSNorm(c.rms_norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name=name)


class Attention(_Layer):
    @nn.compact
    def __call__(self, x, positions, mask, deterministic: bool, kv: dict | None = None, index=None):
        """x: (B, T, D), positions (B or 1, T) -> (out (B, T, D), new kv or None); masks as `GPT2`'s Attention."""
        c = self.config
        batch, length, _ = x.shape
        heads, kv_heads, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.linear(heads * dh, "q_proj", c.qkv_bias)(x, deterministic).reshape(batch, length, heads, dh)
        k = self.linear(kv_heads * dh, "k_proj", c.qkv_bias)(x, deterministic).reshape(batch, length, kv_heads, dh)
        v = self.linear(kv_heads * dh, "v_proj", c.qkv_bias)(x, deterministic).reshape(batch, length, kv_heads, dh)
        inv_freq = inv_frequencies(dh, c.rope_theta, c.rope_scaling)
        q, k = rotate(q, positions, inv_freq), rotate(k, positions, inv_freq)
        scale = 1.0 / math.sqrt(dh)
        if kv is None:
            out = causal_attention(q, k, v, mask, scale, c.attention)
        else:
            out, kv = cached_attention(q, k, v, kv, index, mask, scale)
        out = self.linear(c.hidden_size, "o_proj", c.attention_bias)(
            out.reshape(batch, length, heads * dh), deterministic
        )
        return out, kv


class MLP(_Layer):
    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        gate = self.linear(c.intermediate_size, "gate_proj", c.mlp_bias)(x, deterministic)
        up = self.linear(c.intermediate_size, "up_proj", c.mlp_bias)(x, deterministic)
        return self.linear(c.hidden_size, "down_proj", c.mlp_bias)(jax.nn.silu(gate) * up, deterministic)


class Block(_Layer):
    @nn.compact
    def __call__(self, x, positions, mask, deterministic: bool = True, kv: dict | None = None, index=None):
        attn, kv = Attention(self.config, self.lora, name="self_attn")(
            self.norm("input_layernorm")(x), positions, mask, deterministic, kv, index
        )
        x = x + attn
        x = x + MLP(self.config, self.lora, name="mlp")(self.norm("post_attention_layernorm")(x), deterministic)
        return x, kv


class Blocks(_Layer):
    """The stack ``layers``; blocks named "0" .. "n-1" as in the checkpoint."""

    @nn.compact
    def __call__(self, x, positions, mask, deterministic: bool, cache: dict | None = None, index=None):
        block = nn.remat(Block, static_argnums=(4,)) if self.config.remat and cache is None else Block
        layers = {}
        for i in range(self.config.num_hidden_layers):
            kv = None if cache is None else cache[str(i)]
            x, layers[str(i)] = block(self.config, self.lora, name=str(i))(x, positions, mask, deterministic, kv, index)
        return x, None if cache is None else layers


class Llama(_Layer):
    """A Llama-family language model: token ids (B, T) -> logits (B, T, V); methods as `jlora.GPT2`'s
    (`hidden`, `decode`, `logits`, `head_weight`, `init_cache`)."""

    def setup(self):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        embed = functools.partial(
            nn.Embed, dtype=dtype, param_dtype=param_dtype, embedding_init=normal(c.initializer_range)
        )
        self.embed_tokens = embed(c.vocab_size, c.hidden_size)
        self.layers = Blocks(c, self.lora)
        self.norm = RMSNorm(c.rms_norm_eps, dtype, param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = embed(c.vocab_size, c.hidden_size)

    def hidden(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states (B, T, D), after the last norm; arguments as `GPT2.hidden`'s (the
        Llama family has no dropout: `deterministic` changes only the adapters' LoRA dropout)."""
        check_token_ids(input_ids, self.config.vocab_size)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])[None, :]
        x = self.embed_tokens(input_ids)
        x, _ = self.layers(x, position_ids, training_mask(attention_mask, segment_ids), deterministic)
        return self.norm(x)

    def decode(self, input_ids: jax.Array, cache: dict, attention_mask: jax.Array | None = None):
        """(hidden (B, T, D), new cache): T more tokens through the KV cache, as `GPT2.decode`."""
        check_token_ids(input_ids, self.config.vocab_size)
        index = cache["index"]
        position_ids, mask, key_mask = decode_positions(cache, input_ids, attention_mask)
        x, layers = self.layers(self.embed_tokens(input_ids), position_ids, mask, True, cache["layers"], index)
        return self.norm(x), {"index": index + input_ids.shape[1], "mask": key_mask, "layers": layers}

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head: (..., D) -> (..., V) in the compute dtype (tied to the embedding, or its own)."""
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head.attend(hidden)

    def head_weight(self, params: Mapping) -> jax.Array:
        """The LM head's (V, D) matrix in `params`."""
        return params["embed_tokens" if self.config.tie_word_embeddings else "lm_head"]["embedding"]

    def init_cache(self, batch: int, max_length: int) -> dict:
        """An empty KV cache for `batch` rows of up to `max_length` tokens."""
        return init_cache(self.config, batch, max_length)

    def __call__(self, input_ids: jax.Array, *args, **kwargs) -> jax.Array:
        """Logits (B, T, V) of ``hidden(input_ids, attention_mask, position_ids, deterministic)``."""
        return self.logits(self.hidden(input_ids, *args, **kwargs))


def init_cache(config: LlamaConfig, batch: int, max_length: int) -> dict:
    """An empty KV cache for `batch` rows of up to `max_length` tokens (`jlora.core.models.decoder`)."""
    c = config
    if max_length > c.max_position_embeddings:
        raise ValueError(f"a cache of {max_length} tokens exceeds the model's {c.max_position_embeddings} positions")
    return empty_cache("layers", c.num_hidden_layers, batch, max_length, c.num_key_value_heads, c.head_dim, c.dtype)


@functools.partial(jax.jit, static_argnums=1)
def init_params(key: jax.Array, config: LlamaConfig) -> dict:
    """A randomly initialised base parameter tree (normal(initializer_range) weights, unit norms), drawn with `key`."""
    return Llama(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def param_shapes(config: LlamaConfig) -> dict:
    """The base parameter tree's shapes and dtypes, without allocating it."""
    return jax.eval_shape(lambda: init_params(jax.random.key(0), config))


def random_params(seed: int, config: LlamaConfig) -> dict:
    """A random base drawn on the host with numpy, the same bits on every machine (as `jlora.random_params`):
    each leaf from ``default_rng((seed, crc32(path)))``, normal(initializer_range) weights, zero biases,
    unit norms."""

    def draw(key_path, leaf):
        path = dotted(key_path)
        if path.endswith(".scale"):
            value = np.ones(leaf.shape, np.float32)
        elif path.endswith(".bias"):
            value = np.zeros(leaf.shape, np.float32)
        else:
            rng = np.random.default_rng((seed, zlib.crc32(path.encode())))
            value = config.initializer_range * rng.standard_normal(leaf.shape, dtype=np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


# The Hugging Face mapping: one rename per tensor, linear weights transposed ((out, in) -> kernel (in, out)).
HF_PREFIX = "model."
_HF_LEAF = {"weight": "kernel", "bias": "bias"}


def hf_key_to_path(key: str) -> tuple[str, ...] | None:
    """A checkpoint key -> its path in the parameter tree (None: a key jlora does not keep).

    >>> hf_key_to_path("model.layers.3.self_attn.q_proj.weight"), hf_key_to_path("lm_head.weight")
    (('layers', '3', 'self_attn', 'q_proj', 'kernel'), ('lm_head', 'embedding'))
    """
    if key == "lm_head.weight":
        return ("lm_head", "embedding")
    parts = key.removeprefix(HF_PREFIX).split(".")
    if parts == ["embed_tokens", "weight"]:
        return ("embed_tokens", "embedding")
    if parts == ["norm", "weight"]:
        return ("norm", "scale")
    if parts[0] == "layers" and len(parts) == 4 and parts[2].endswith("layernorm") and parts[3] == "weight":
        return ("layers", parts[1], parts[2], "scale")
    if parts[0] == "layers" and len(parts) == 5 and parts[2] in ("self_attn", "mlp") and parts[4] in _HF_LEAF:
        return ("layers", parts[1], parts[2], parts[3], _HF_LEAF[parts[4]])
    return None


def is_buffer(key: str, config: LlamaConfig) -> bool:
    """Checkpoint keys that are no parameter of ours: rotary buffers of older checkpoints, and a tied LM head."""
    return key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings)


def from_hf(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A checkpoint tensor in our layout: linear weights (out, in) -> kernels (in, out)."""
    return value.T if path[-1] == "kernel" else value


def state_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """The nested parameter tree -> a flat Hugging Face state dict (kernels transposed back)."""
    names = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    state = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [k.key for k in key_path]
        value = np.asarray(leaf)
        name = ".".join(keys[:-1] + [names[keys[-1]]])
        state[name if keys[0] == "lm_head" else HF_PREFIX + name] = value.T if keys[-1] == "kernel" else value
    return state
