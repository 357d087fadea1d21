"""GPT-2 in Flax linen, with LoRA read from a separate ``"lora"`` collection.

The parameter tree is the Hugging Face checkpoint's, key for key (see `hf_checkpoint`)::

    params: wte/embedding (V, D)   wpe/embedding (P, D)   ln_f/{scale, bias}
            h/{i}/ln_1, ln_2                 /{scale, bias}
            h/{i}/attn/c_attn, c_proj        /{kernel (d_in, d_out), bias}
            h/{i}/mlp/c_fc, c_proj           /{kernel (d_in, d_out), bias}

GPT-2's Conv1D stores its weight (d_in, d_out) and computes ``x @ W + b``; the shared adapted
layer `jlora.core.models.linear.Linear` keeps that layout, so no weight is transposed on load. A
`Linear` whose path has an entry in the ``"lora"`` collection adds its adapter's update,
``scaling * B A dropout(x)`` with the scale the adapter carries; with no ``"lora"`` collection the
model is exactly the base model::

    model.apply({"params": params, "lora": lora}, ids)   # adapted
    model.apply({"params": params}, ids)                 # base

The model's `LoraConfig` gives the LoRA dropout rate only; a population's members (under `vmap`)
and a mixed batch's stacked adapters reach the same layer, each adapter with its own scale.

Pre-LN blocks, gelu_new (tanh approximation), learned positions, LM head tied to `wte`.
Attention goes through `jax.nn.dot_product_attention`: the fused cuDNN kernel on a GPU in half
precision (`causal_attention`), plain XLA elsewhere.
Token ids must lie in 0 .. vocab_size - 1: `check_token_ids` refuses others in an eager call
(a `DataError`); under jit they cannot be checked and give NaN logits (see there).
Attention-probability dropout is not applied (the fused kernels have none); embedding,
residual and LoRA dropout are, in training mode (``deterministic=False`` with a
``"dropout"`` RNG), with masks from a counter hash of the key (`jlora.core.models.dropout`: a tenth of
threefry's cost per mask on a CPU).

Decoding is its own method, `GPT2.decode`, threading an explicit KV cache, a plain pytree of
fixed size (`init_cache`)::

    cache = {"index": () int32,          # slots filled so far (the same for every row)
             "mask":  (B, T_max) bool,   # which filled slots hold real tokens (left padding: False)
             "h": {"0": {"k": (B, T_max, H, Dh), "v": (B, T_max, H, Dh)}, ...}}
    hidden, cache = model.apply(variables, ids, cache, attention_mask, method=GPT2.decode)

Each call writes its T tokens at slots index .. index+T-1 and attends over all T_max slots
through an explicit mask, so the shapes never change and a jitted step compiles once.
Positions come from the mask as in transformers (real tokens before this one), so
left-padded prompts decode as they would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.lora.config import LoraConfig
from jlora.core.models.decoder import (
    cached_attention,
    causal_attention,
    check_token_ids,
    decode_positions,
    empty_cache,
    training_mask,
)
from jlora.core.models.dropout import Dropout
from jlora.core.models.linear import Linear, normal
from jlora.errors import ConfigError
from jlora.tree import dotted

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_FIELD_TYPES = {
    **{k: (int,) for k in _SIZES},
    **{k: (int, float) for k in ("layer_norm_epsilon", "embd_pdrop", "resid_pdrop")},
}
NUMERICS = ("dtype", "param_dtype", "attention", "remat")  # jlora's options, not the checkpoint's
BLOCKS = "h"  # the blocks' node in the parameter tree
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's linear modules: what LoRA can adapt
# base modules PEFT's modules_to_save can hold whole (by last name): their leaves (wte is tied to the LM head)
SAVABLE = {"ln_1": ("scale", "bias"), "ln_2": ("scale", "bias"), "ln_f": ("scale", "bias"), "wpe": ("embedding",)}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters (Hugging Face names) plus jlora's numerics options.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the base weights;
    `attention` is the implementation of `jax.nn.dot_product_attention` for training and
    scoring (None: the fused cuDNN kernel on a GPU in half precision when the batch needs no
    mask, else XLA; "cudnn": require the fused kernel; "xla": plain XLA); `remat` recomputes
    each block's activations in the backward pass.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    scale_attn_by_inverse_layer_idx: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str | None = None
    remat: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES.get(f.name)
            if kind is not None and not (isinstance(value, kind) and not isinstance(value, bool)):
                raise ConfigError(f"GPT2Config.{f.name} must be {' or '.join(t.__name__ for t in kind)}, got {value!r}")
            if kind == (int,) and value <= 0:
                raise ConfigError(f"GPT2Config.{f.name} must be > 0, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation_function {self.activation_function!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        for name in ("dtype", "param_dtype"):
            value = jnp.dtype(getattr(self, name)).name
            if value not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {value!r}")
            object.__setattr__(self, name, value)

    @property
    def d_inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: Mapping, **overrides) -> GPT2Config:
        """From a Hugging Face ``config.json`` dict (unknown keys are ignored)."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"not a GPT-2 checkpoint: model_type={model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - set(NUMERICS)  # HF's own "dtype" is not ours
        return cls(**{k: v for k, v in hf.items() if k in names}, **overrides)

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` fields (without jlora's numerics options)."""
        keep = {f.name for f in dataclasses.fields(self)} - set(NUMERICS)
        hf = {k: v for k, v in dataclasses.asdict(self).items() if k in keep}
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": True, **hf}


class _Layer(nn.Module):
    """Holds what every sub-layer needs: the config, LoRA config and dtypes."""

    config: GPT2Config
    lora: LoraConfig | None = None

    def linear(self, features: int, name: str, init_std: float = 0.02) -> Linear:
        c = self.config
        dropout = 0.0 if self.lora is None else self.lora.dropout
        return Linear(features, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), init_std, lora_dropout=dropout, name=name)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        c = self.config
        return nn.LayerNorm(
            c.layer_norm_epsilon, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), name=name
        )

    @property
    def proj_std(self) -> float:  # GPT-2 scales residual projections by 1/sqrt(2 n_layer) at init
        return 0.02 / math.sqrt(2 * self.config.n_layer)


class Attention(_Layer):
    layer_idx: int = 0

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, deterministic: bool, kv: dict | None = None, index=None
    ) -> tuple[jax.Array, dict | None]:
        """x: (B, T, D) -> (out (B, T, D), new kv or None).

        Training (`kv` None): `mask` is (B, 1, 1, T) bool keys to attend to, or None; attention is
        causal. Decoding (`kv` = {"k", "v"}: (B, T_max, H, Dh)): the new keys and values are
        written at slots index .. index+T-1, `mask` is (B, 1, T, T_max) and already causal.
        """
        c = self.config
        batch, length, d = x.shape
        head_dim = d // c.n_head
        qkv = self.linear(3 * d, "c_attn")(x, deterministic)
        q, k, v = (t.reshape(batch, length, c.n_head, head_dim) for t in jnp.split(qkv, 3, axis=-1))
        scale = 1.0 / math.sqrt(head_dim)
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        if kv is None:
            out = causal_attention(q, k, v, mask, scale, c.attention)
        else:
            out, kv = cached_attention(q, k, v, kv, index, mask, scale)
        out = self.linear(d, "c_proj", self.proj_std)(out.reshape(batch, length, d), deterministic)
        return Dropout(c.resid_pdrop)(out, deterministic=deterministic), kv


class MLP(_Layer):
    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        h = ACTIVATIONS[c.activation_function](self.linear(c.d_inner, "c_fc")(x, deterministic))
        h = self.linear(c.n_embd, "c_proj", self.proj_std)(h, deterministic)
        return Dropout(c.resid_pdrop)(h, deterministic=deterministic)


class Block(_Layer):
    layer_idx: int = 0

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, deterministic: bool = True, kv: dict | None = None, index=None
    ) -> tuple[jax.Array, dict | None]:
        """x: (B, T, D) -> (x (B, T, D), new kv or None); see `Attention`."""
        attn, kv = Attention(self.config, self.lora, self.layer_idx, name="attn")(
            self.layer_norm("ln_1")(x), mask, deterministic, kv, index
        )
        x = x + attn
        x = x + MLP(self.config, self.lora, name="mlp")(self.layer_norm("ln_2")(x), deterministic)
        return x, kv


class Blocks(_Layer):
    """The stack ``h``; blocks are named "0" .. "n_layer-1" as in the checkpoint."""

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, deterministic: bool, cache: dict | None = None, index=None
    ) -> tuple[jax.Array, dict | None]:
        """x: (B, T, D) -> (x, the cache's new {"0": {"k", "v"}, ...} or None when decoding without one)."""
        block = nn.remat(Block, static_argnums=(3,)) if self.config.remat and cache is None else Block
        layers = {}
        for i in range(self.config.n_layer):
            kv = None if cache is None else cache[str(i)]
            x, layers[str(i)] = block(self.config, self.lora, i, name=str(i))(x, mask, deterministic, kv, index)
        return x, None if cache is None else layers


class GPT2(_Layer):
    """GPT-2 language model: token ids (B, T) -> logits (B, T, V).

    `lora` (a `LoraConfig`) tells the adapted layers their dropout rate; which layers
    are adapted is read from the ``"lora"`` collection passed to `apply`. Three methods:
    `__call__` (logits), `hidden` (the final hidden states, for a loss that applies the head
    itself) and `decode` (hidden states and the updated KV cache).
    """

    def setup(self):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=dtype, param_dtype=param_dtype, embedding_init=normal(0.02))
        self.wpe = nn.Embed(c.n_positions, c.n_embd, dtype=dtype, param_dtype=param_dtype, embedding_init=normal(0.01))
        self.h = Blocks(c, self.lora)
        self.ln_f = self.layer_norm("ln_f")
        self.embd_dropout = Dropout(c.embd_pdrop)

    def hidden(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states (B, T, D), after `ln_f`.

        Args:
          input_ids: (B, T) int token ids.
          attention_mask: (B, T), 1 for tokens and 0 for padding, or None. With right
            padding it changes no real token's output (attention is causal), so a training
            step can leave it out and keep the fused attention kernel eligible.
          position_ids: (B, T) or None for 0 .. T-1; packed rows restart theirs at 0.
          deterministic: False to train with dropout (needs a "dropout" RNG).
          segment_ids: (B, T) int or None: several rows packed in one sequence, a token
            attending only to earlier tokens of its own segment (padding: a segment of its own).
        """
        check_token_ids(input_ids, self.config.vocab_size)
        length = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.arange(length)[None, :]
        x = self.wte(input_ids) + self.wpe(position_ids)
        x = self.embd_dropout(x, deterministic=deterministic)
        x, _ = self.h(x, training_mask(attention_mask, segment_ids), deterministic)
        return self.ln_f(x)

    def decode(
        self, input_ids: jax.Array, cache: dict, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """(hidden (B, T, D), new cache): T more tokens through a KV cache (see the module doc).

        Args:
          input_ids: (B, T) the next tokens of each row (the left-padded prompts, then one at a time).
          cache: from `init_cache`, or the previous call.
          attention_mask: (B, T), 0 for left padding (None: all real). Positions come from the
            cache's mask as in transformers: the number of real tokens before this one.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        index = cache["index"]
        position_ids, mask, key_mask = decode_positions(cache, input_ids, attention_mask)
        x = self.wte(input_ids) + self.wpe(position_ids)
        x, layers = self.h(x, mask, True, cache["h"], index)
        return self.ln_f(x), {"index": index + input_ids.shape[1], "mask": key_mask, "h": layers}

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The tied LM head: (..., D) -> (..., V) in the compute dtype."""
        return self.wte.attend(hidden)

    @staticmethod
    def head_weight(params: Mapping) -> jax.Array:
        """The LM head's (V, D) matrix in `params` (GPT-2's is tied to the token embedding)."""
        return params["wte"]["embedding"]

    def init_cache(self, batch: int, max_length: int) -> dict:
        """An empty KV cache for `batch` rows of up to `max_length` tokens (`init_cache`)."""
        return init_cache(self.config, batch, max_length)

    def __call__(self, input_ids: jax.Array, *args, **kwargs) -> jax.Array:
        """Logits (B, T, V) of ``hidden(input_ids, attention_mask, position_ids, deterministic)``."""
        return self.logits(self.hidden(input_ids, *args, **kwargs))


@functools.partial(jax.jit, static_argnums=1)
def init_params(key: jax.Array, config: GPT2Config) -> dict:
    """A randomly initialised base parameter tree (GPT-2's initialisation), drawn with `key`.

    Compiled as one program (op by op, Flax's init would compile every initializer apart), once
    per config. Its float bits depend on XLA's code generation (flags, vector units); a base that
    must be the same on every machine is `random_params`'.
    """
    return GPT2(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_std(path: str, config: GPT2Config) -> float | None:
    """The standard deviation GPT-2's initialisation draws leaf `path` with; None: a constant leaf (a bias,
    zero, or a LayerNorm scale, one). The residual projections (``c_proj``) are scaled by 1/sqrt(2 n_layer)."""
    if path == "wte.embedding":
        return 0.02
    if path == "wpe.embedding":
        return 0.01
    if path.endswith(".kernel"):
        return 0.02 / math.sqrt(2 * config.n_layer) if path.endswith("c_proj.kernel") else 0.02
    return None


def random_params(seed: int, config: GPT2Config) -> dict:
    """A random base drawn on the host with numpy's generator, the same bits on every machine.

    The distribution is `init_params`' (normal leaves with `init_std`, zero biases, unit LayerNorm
    scales); each leaf has its own stream, ``default_rng((seed, crc32(path)))``, so no leaf depends on
    the order of the others. This is the base of a ``model: random`` run: a run started under one
    ``XLA_FLAGS`` or CPU resumes under another, its base the same to the bit.

    >>> small = GPT2Config(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=1)
    >>> p = random_params(0, small)
    >>> p["wte"]["embedding"].shape, float(p["h"]["0"]["ln_1"]["scale"][0])
    ((11, 4), 1.0)
    >>> bool((random_params(0, small)["wte"]["embedding"] == p["wte"]["embedding"]).all())
    True
    """

    def draw(key_path, leaf):
        path = dotted(key_path)
        std = init_std(path, config)
        if std is None:
            value = np.ones(leaf.shape, np.float32) if path.endswith(".scale") else np.zeros(leaf.shape, np.float32)
        else:
            rng = np.random.default_rng((seed, zlib.crc32(path.encode())))
            value = std * rng.standard_normal(leaf.shape, dtype=np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


def init_cache(config: GPT2Config, batch: int, max_length: int) -> dict:
    """An empty KV cache for `batch` rows of up to `max_length` tokens (see the module doc)."""
    if max_length > config.n_positions:
        raise ValueError(f"a cache of {max_length} tokens exceeds the model's n_positions={config.n_positions}")
    head_dim = config.n_embd // config.n_head
    return empty_cache("h", config.n_layer, batch, max_length, config.n_head, head_dim, config.dtype)


def param_shapes(config: GPT2Config) -> dict:
    """The base parameter tree's shapes and dtypes, without allocating it."""
    return jax.eval_shape(lambda: init_params(jax.random.key(0), config))


# The Hugging Face mapping: one rename per tensor and no transpose (Conv1D already stores (d_in, d_out)).
HF_PREFIX = "transformer."
_HF_LEAF = {"weight": "kernel", "bias": "bias"}


def hf_key_to_path(key: str) -> tuple[str, ...] | None:
    """A checkpoint key -> its path in the parameter tree (None: a key jlora does not keep).

    >>> hf_key_to_path("transformer.h.3.attn.c_attn.weight"), hf_key_to_path("h.0.ln_1.bias")
    (('h', '3', 'attn', 'c_attn', 'kernel'), ('h', '0', 'ln_1', 'bias'))
    """
    parts = key.removeprefix(HF_PREFIX).split(".")
    if parts[0] in ("wte", "wpe") and parts[1:] == ["weight"]:
        return (parts[0], "embedding")
    if parts[0] == "ln_f":
        return ("ln_f", "scale" if parts[1] == "weight" else "bias")
    if parts[0] == "h" and len(parts) == 4 and parts[2] in ("ln_1", "ln_2"):
        return ("h", parts[1], parts[2], "scale" if parts[3] == "weight" else "bias")
    if parts[0] == "h" and len(parts) == 5 and parts[2] in ("attn", "mlp") and parts[4] in _HF_LEAF:
        return ("h", parts[1], parts[2], parts[3], _HF_LEAF[parts[4]])
    return None


def is_buffer(key: str, config: GPT2Config | None = None) -> bool:
    """Checkpoint keys that are no parameter of ours: the tied LM head, older checkpoints' causal-mask buffers."""
    parts = key.removeprefix(HF_PREFIX).split(".")
    return key.startswith("lm_head.") or (
        len(parts) == 4 and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")
    )


def from_hf(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A checkpoint tensor in our layout: GPT-2's, as it is."""
    return value


def state_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """The nested parameter tree -> a flat Hugging Face state dict (``transformer.`` keys)."""
    names = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    state = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [k.key for k in key_path]
        state[HF_PREFIX + ".".join(keys[:-1] + [names[keys[-1]]])] = np.asarray(leaf)
    return state
