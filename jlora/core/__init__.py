"""The core: the LoRA maths, the model and one training update, as pure functions over pytrees.

    lora_config.py   LoraConfig: targets, ranks, alpha, scaling = alpha / r, effective lr
    lora.py          the LoRA tree {"A": (r, d_in), "B": (d_out, r)} per module: init, layout, the update
    dora.py          DoRA: the magnitude m and the column norm ||W + s B A||, from the factors
    residual.py      PiSSA / OLoRA: A, B from W's SVD / QR on a residual base; conversion to plain LoRA
    gpt2.py          GPT-2 in Flax linen reading adapters from a separate "lora" collection; KV cache
    generate.py      batched decoding with the cache in one compiled loop
    merge.py         W' = W + scaling * B A and back
    svd.py           the spectrum of dW from its factors, subspace similarity, truncation, intruders
    counting.py      parameter counts
    loss.py          masked next-token cross-entropy
    optim.py         the trainable mask, partition / combine, AdamW (+ LoRA+)
    step.py          the train and evaluation steps, jit or pmap
    parallel.py      replicate / shard over devices, multi-host start
    population.py    many adapters on one base, stacked, trained by one vmapped step
    task_vectors.py  merging task tensors: task arithmetic, TIES, DARE, magnitude pruning (PEFT's merge_utils)
    combine.py       one adapter from several, every PEFT combination type (combine_adapters)
    mixed.py         K adapters stacked over one base, each row of a batch answered by its own
    telemetry.py     the spectrum of each dW and its drift, from the factors, while training
    divergence.py    KL divergence; forgetting on held-out text (loss, base loss, KL)

No file, no run directory, no command line: the core imports only `jlora.tree`,
`jlora.errors` and itself (tests/test_layers.py checks).
"""
