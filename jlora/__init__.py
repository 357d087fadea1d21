"""jlora: LoRA fine-tuning of GPT-2 in JAX, as pure functions over plain pytrees.

    model, params = jlora.load_gpt2("gpt2", lora=jlora.LoraConfig(r=8, alpha=16))
    lora = jlora.init_lora(jax.random.key(0), model, params)
    logits = model.apply({"params": params, "lora": lora}, input_ids)

The names below are the public surface, grouped as the package is: the model and its
adapters, the LoRA maths, training, checkpoints and exchange, generation.
"""

# the model and its adapters
from jlora.checkpoint import load_adapter, load_checkpoint, load_run
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
    # model and adapters
    "GPT2",
    "GPT2Config",
    "LoraConfig",
    "CheckpointError",
    "load_gpt2",
    "save_gpt2",
    "init_params",
    "init_lora",
    "init_cache",
    "flatten_adapters",
    "unflatten_adapters",
    "lora_delta",
    # the LoRA maths
    "scaling",
    "effective_lr",
    "alpha_for_rank",
    "adapter_param_count",
    "adapter_compression",
    "module_counts",
    "lora_param_count",
    "compression_ratio",
    "delta_w",
    "merge",
    "unmerge",
    "delta_svd",
    "factored_svd",
    "spectrum",
    "amplification",
    "subspace_similarity",
    "subspace_similarity_grid",
    "lora_from_delta",
    # training
    "OptimConfig",
    "learning_rate",
    "trainable_mask",
    "partition",
    "combine",
    "make_optimizer",
    "TrainState",
    "init_state",
    "train_step",
    "make_train_step",
    "make_eval_step",
    "replicate",
    "unreplicate",
    "shard_batch",
    "initialize_distributed",
    # checkpoints and exchange
    "load_adapter",
    "load_checkpoint",
    "load_run",
    "save_peft",
    "load_peft",
    "save_merged",
    # generation
    "Generation",
    "generate",
    "generate_text",
]
