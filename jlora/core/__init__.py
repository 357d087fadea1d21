"""The core: the LoRA maths, the models and one training update, as pure functions over pytrees.

Six rooms, each importing only the rooms above it in this list (tests/test_layers.py checks)::

    lora/       what an adapter is: LoraConfig, the adapter tree, DoRA, PiSSA / OLoRA, merge, SVD, counts
    models/     the Flax decoders that read adapters from a separate "lora" collection (GPT-2)
    update/     the training update: loss, optimizer, the compiled step, placement, populations
    algebra/    adapters as values: combining several into one, mixed-adapter batches
    decoding/   batched generation with a KV cache
    analysis/   the spectrum of each update while training, forgetting

No file, no run directory, no command line: the core imports only `jlora.tree`,
`jlora.errors` and itself.
"""
