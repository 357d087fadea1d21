"""The adapted linear layer every model family builds on: ``x @ kernel + bias``, plus its adapter's update.

A model knows nothing of LoRA but this layer: its kernel is stored (d_in, d_out) (GPT-2's Conv1D
layout; a Llama checkpoint's (out, in) weights are transposed once, on load), and the adapter at
its path in the "lora" collection, if any, adds its update with the scale it carries::

    y = x @ kernel + bias + module_delta(dropout(x), adapter)            plain, q/k/v slices, stacked
    y = (m / n) * (x @ kernel + module_delta(dropout(x), adapter)) + bias        DoRA (adapter has "m")

one path for a single adapter, a fused projection's slice adapters (`slices`), a population
member's (under `vmap`: an ordinary adapter) and a mixed batch's K stacked adapters
(`jlora.core.lora.adapter.module_delta`). LoRA dropout acts on the input of the adapter's path
only, as in PEFT; the rate is the model's (its `LoraConfig`'s), the scale the adapter's own.

>>> import jax, jax.numpy as jnp
>>> layer = Linear(3, dtype=jnp.float32, param_dtype=jnp.float32)
>>> params = {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}
>>> adapter = {"A": jnp.ones((1, 2)), "B": jnp.ones((3, 1)), "scaling": jnp.asarray(0.5)}
>>> layer.apply({"params": params, "lora": adapter}, jnp.ones((1, 2))).tolist()   # 2 + 0.5 * 2
[[3.0, 3.0, 3.0]]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.core.lora.adapter import module_delta, scaling_of
from jlora.core.lora.dora import dora_output
from jlora.core.models.dropout import Dropout


def normal(std: float):
    """The normal initializer with standard deviation `std` (GPT-2's and Llama's ``initializer_range``)."""
    return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
    """``x @ kernel + bias`` with kernel (d_in, d_out), plus the update of the adapter at this module's path.

    Attributes:
      features: d_out.
      dtype, param_dtype: the compute dtype and the kernel's storage dtype.
      init_std: the kernel's initial standard deviation.
      use_bias: whether the layer has a bias (GPT-2's all do; Llama's none, Qwen2's q/k/v do).
      lora_dropout: the rate of dropout on the adapter path's input (training mode only).
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    use_bias: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x: (..., d_in) -> (..., d_out)."""
        kernel = self.param("kernel", normal(self.init_std), (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        base = x @ kernel.astype(self.dtype)
        bias = 0
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        node = self.variables.get("lora")
        if not node:
            return base + bias
        dropout_off = deterministic or self.lora_dropout == 0
        x_dropped = Dropout(self.lora_dropout)(x, deterministic=dropout_off)
        path = ".".join(self.scope.path)
        delta = module_delta(x_dropped, node, self.features, path)
        if "m" in node:  # DoRA: whole modules only (LoraConfig refuses slices with it)
            dropped = None if dropout_off else x_dropped
            return dora_output(base, delta, kernel, node, scaling_of(node, path), dropped) + bias
        return base + bias + delta
