"""jlora: LoRA fine-tuning of GPT-2 and Llama-family models in JAX, as pure functions over plain pytrees.

    model, params = jlora.load_model("gpt2", lora=jlora.LoraConfig(r=8, alpha=16))   # or a Llama folder, a GGUF
    lora = jlora.init_lora(jax.random.key(0), model, params)
    logits = model.apply({"params": params, "lora": lora}, input_ids)

The package is layered; a layer imports only the layers below it (tests/test_layers.py checks)::

    jlora.cli          the `jlora` command                              (may import everything)
    jlora.research     diagnose, experiments, planted rank, plots       (training, exchange, core)
    jlora.training     the run behind `jlora train`: data, loop, hooks, checkpoints, metrics
    jlora.exchange     Hugging Face checkpoints, PEFT folders, merged export            (core)
    jlora.core         the adapter value, GPT-2 and Llama families, merge, SVD, update, algebra, decoding
    jlora.tree, jlora.errors    path helpers and the error hierarchy          (nothing of jlora)

The names below are the public surface, grouped as the package is: the model and its
adapters, the LoRA maths, training, populations, adapters as values (combining them, many in
one batch), checkpoints and exchange, generation, errors.
"""

from jlora.core.algebra.combine import combine_adapters
from jlora.core.algebra.mixed import AdapterStack, make_mixed_eval_step, mixed_variables, stack_adapters
from jlora.core.decoding.generate import Generation, generate, generate_text
from jlora.core.lora.adapter import (
    adapters_by_module,
    flatten_adapters,
    init_lora,
    lora_delta,
    map_factors,
    unflatten_adapters,
    with_scaling,
    without_scaling,
)
from jlora.core.lora.config import LoraConfig, alpha_for_rank, effective_lr, scaling
from jlora.core.lora.counting import (
    adapter_compression,
    adapter_param_count,
    compression_ratio,
    lora_param_count,
    module_counts,
)
from jlora.core.lora.merge import delta_w, merge, unmerge
from jlora.core.lora.residual import as_plain_lora, init_adapters
from jlora.core.lora.svd import (
    amplification,
    delta_svd,
    factored_svd,
    intruder_dimensions,
    lora_from_delta,
    module_intruders,
    spectrum,
    subspace_similarity,
    subspace_similarity_grid,
)
from jlora.core.models.gpt2 import GPT2, GPT2Config, init_cache, init_params, param_shapes, random_params
from jlora.core.models.llama import Llama, LlamaConfig
from jlora.core.update.mesh import Placement, fetch, initialize_distributed, mesh_placement
from jlora.core.update.optim import OptimConfig, combine, learning_rate, make_optimizer, partition, trainable_mask
from jlora.core.update.population import (
    Member,
    Population,
    init_population,
    make_population_step,
    member_keys,
    population,
    split_member,
    stack_variables,
)
from jlora.core.update.step import (
    EvalStep,
    TrainState,
    TrainStep,
    init_state,
    init_training,
    make_eval_step,
    make_train_step,
    train_step,
)
from jlora.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    DataError,
    JloraError,
    NonFiniteError,
    RunError,
    TokenizerError,
)
from jlora.exchange.hf_checkpoint import load_gpt2, load_model, save_gpt2, save_model
from jlora.exchange.merged import save_merged
from jlora.exchange.peft import load_peft, save_peft
from jlora.training.records.artifacts import Artifact, TrainedAdapter, load_checkpoint, load_run, open_artifact
from jlora.training.records.checkpoint import load_adapter, load_init, lora_config_of

__all__ = [
    # model and adapters
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "LoraConfig",
    "CheckpointError",
    "load_gpt2",
    "save_gpt2",
    "load_model",
    "save_model",
    "init_params",
    "random_params",
    "param_shapes",
    "init_lora",
    "with_scaling",
    "without_scaling",
    "map_factors",
    "init_adapters",
    "as_plain_lora",
    "init_cache",
    "flatten_adapters",
    "unflatten_adapters",
    "adapters_by_module",
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
    "intruder_dimensions",
    "module_intruders",
    # training
    "OptimConfig",
    "learning_rate",
    "trainable_mask",
    "partition",
    "combine",
    "make_optimizer",
    "TrainState",
    "TrainStep",
    "EvalStep",
    "init_state",
    "init_training",
    "train_step",
    "make_train_step",
    "make_eval_step",
    "Placement",
    "mesh_placement",
    "fetch",
    "initialize_distributed",
    # populations: many adapters in one compiled step
    "Member",
    "Population",
    "population",
    "stack_variables",
    "init_population",
    "make_population_step",
    "member_keys",
    "split_member",
    # adapters as values: combining them, many answering at once
    "combine_adapters",
    "AdapterStack",
    "stack_adapters",
    "mixed_variables",
    "make_mixed_eval_step",
    # checkpoints and exchange
    "open_artifact",
    "Artifact",
    "TrainedAdapter",
    "load_adapter",
    "load_init",
    "load_checkpoint",
    "load_run",
    "lora_config_of",
    "save_peft",
    "load_peft",
    "save_merged",
    # generation
    "Generation",
    "generate",
    "generate_text",
    # errors
    "JloraError",
    "ConfigError",
    "DataError",
    "TokenizerError",
    "BaseMismatchError",
    "RunError",
    "NonFiniteError",
]
