"""jlora: LoRA fine-tuning of GPT-2 in JAX, as pure functions over plain pytrees.

model, params = jlora.load_gpt2("gpt2", lora=jlora.LoraConfig(r=8, alpha=16))
lora = jlora.init_lora(jax.random.key(0), model, params)
logits = model.apply({"params": params, "lora": lora}, input_ids)
"""

from jlora.counting import (
    adapter_compression,
    adapter_param_count,
    compression_ratio,
    lora_param_count,
    module_counts,
)
from jlora.generate import Generation, generate, generate_text
from jlora.gpt2 import GPT2, GPT2Config, init_cache, init_params
from jlora.hf_checkpoint import CheckpointError, load_gpt2, save_gpt2
from jlora.hf_export import save_merged
from jlora.lora import flatten_adapters, init_lora, lora_delta, unflatten_adapters
from jlora.lora_config import LoraConfig, alpha_for_rank, effective_lr, scaling
from jlora.merge import delta_w, merge, unmerge
from jlora.optim import OptimConfig, combine, learning_rate, make_optimizer, partition, trainable_mask
from jlora.parallel import initialize_distributed, replicate, shard_batch, unreplicate
from jlora.peft import load_peft, save_peft
from jlora.svd import (
    amplification,
    delta_svd,
    factored_svd,
    lora_from_delta,
    spectrum,
    subspace_similarity,
    subspace_similarity_grid,
)
from jlora.train_step import TrainState, init_state, make_eval_step, make_train_step, train_step

__all__ = [
    "GPT2",
    "Generation",
    "generate",
    "generate_text",
    "init_cache",
    "load_peft",
    "save_peft",
    "save_merged",
    "CheckpointError",
    "GPT2Config",
    "LoraConfig",
    "alpha_for_rank",
    "effective_lr",
    "flatten_adapters",
    "init_lora",
    "init_params",
    "load_gpt2",
    "lora_delta",
    "save_gpt2",
    "scaling",
    "unflatten_adapters",
    "adapter_compression",
    "adapter_param_count",
    "compression_ratio",
    "lora_param_count",
    "module_counts",
    "delta_w",
    "merge",
    "unmerge",
    "amplification",
    "delta_svd",
    "factored_svd",
    "lora_from_delta",
    "spectrum",
    "subspace_similarity",
    "subspace_similarity_grid",
    "OptimConfig",
    "TrainState",
    "combine",
    "init_state",
    "initialize_distributed",
    "learning_rate",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "partition",
    "replicate",
    "shard_batch",
    "train_step",
    "trainable_mask",
    "unreplicate",
]
