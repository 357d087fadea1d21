"""The run behind `jlora train`: from a config file to checkpoints and metrics.

    run_config.py   RunConfig from YAML and --set overrides, validated
    tokenizer.py    byte tokens (offline) or a GPT-2 BPE tokenizer
    data.py         JSONL / bundled / `datasets` records -> token rows -> the batch of a step
    run.py          build_run: tokenizer, base model, data, first adapters; the Trainer (one adapter)
    members.py      a population's members from the config's `population:` section
    population.py   the Trainer of a population; one member out of a population checkpoint
    loop.py         train_steps (a generator of updates) and run_hooks
    hooks.py        the metrics log (jsonl, TensorBoard, progress bar), telemetry
    evaluate.py     validation loss, perplexity, exact match, forgetting
    checkpoint.py   Orbax checkpoints of what training changes, and the base they belong to
    metrics.py, tensorboard.py   the run's records
    train.py        train(cfg, run_dir): the pieces above, resumable

Imports the core and exchange (a base model from a checkpoint, a PEFT adapter to start from);
nothing of research or the command line.
"""
