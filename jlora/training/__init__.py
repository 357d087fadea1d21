"""The run behind `jlora train`: from a config file to checkpoints and metrics.

    run_config.py   RunConfig from YAML (a file or a packaged config's name) and --set overrides, validated
    tokenizer.py    byte tokens (offline; exported as an equal GPT2TokenizerFast) or a GPT-2 BPE tokenizer
    data.py         JSONL / bundled / `datasets` records -> token rows -> the batch of a step
    batching.py     a batch trimmed to length buckets (or packed), its loss positions listed
    run.py          build_run: tokenizer, base model, data, first adapters; the Trainer (one adapter)
    members.py      a population's members from the config's `population:` section
    population.py   the Trainer of a population; one member out of a population checkpoint
    loop.py         train_steps (a generator of updates) and run_hooks
    hooks.py        the metrics log (jsonl, TensorBoard, progress bar), telemetry
    evaluate.py     validation loss, perplexity, exact match (with a progress callback), forgetting
    prompt.py       a run's prompts in its training form (what `jlora generate RUN_DIR` feeds)
    checkpoint.py   Orbax checkpoints of what training changes, and the base they belong to
    metrics.py, tensorboard.py   the run's records
    train.py        train(cfg, run_dir): the pieces above, resumable

Imports the core and exchange (a base model from a checkpoint, a PEFT adapter to start from);
nothing of research or the command line.
"""
