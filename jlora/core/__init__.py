"""The core: the LoRA maths, the models and one training update, as pure functions over pytrees.

Six rooms, each importing only the rooms above it in this list (tests/test_layers.py checks)::

    lora/       what an adapter is: LoraConfig, the adapter value (its scale inside), DoRA, PiSSA / OLoRA,
                EVA, LoRA-GA, AdaLoRA, merge, SVD, counts
    models/     the Flax decoders that read adapters from a separate "lora" collection: the model
                families (GPT-2, Llama) and the one adapted linear layer they share
    update/     the training update: loss, optimizer, the compiled step, placement, populations
    algebra/    adapters as values: combining several into one, mixed-adapter batches
    decoding/   batched generation with a KV cache, beam search, logits processors
    analysis/   the spectrum of each update while training, forgetting

No file, no run directory, no command line: the core imports only `jlora.tree`,
`jlora.checks`, `jlora.errors` and itself.
"""
