"""Where an update happens: the run config, what a run is built from, the loop and its hooks.

    config.py       RunConfig from YAML (a file or a packaged config's name) and --set overrides, validated
    members.py      a population's members from the config's ``population:`` section
    build.py        build_run: tokenizer, base model, data, first adapters; the Trainer of one adapter
    population.py   the Trainer of a population (K adapters stacked, one vmapped step), a search's survivors
    search.py       successive halving: SearchConfig (``search:``), the rung rule, the loop from rung to rung
    loop.py         train_steps (a generator of updates) and run_hooks
    hooks.py        the metrics log (jsonl, TensorBoard, progress bar), telemetry
    evaluate.py     validation loss, perplexity, exact match (with a progress callback), forgetting
    interrupt.py    SIGINT / SIGTERM as stop requests (shared by every process of a run)
    session.py      a run in progress: the stage training its live members, its records, its hooks
                    (log, evaluation, rung, telemetry, checkpoint, progress) as named methods
    train.py        train(cfg, run_dir): the run built once, a Session resumed and looped

    load_run_config ─> build_run ─> solo_trainer | population_trainer ─> Session ─> run_hooks(steps, hooks)
                                                 (a search: search_steps)  (log, evaluation, rung, checkpoint)

Reads batches from `jlora.training.data` and writes through `jlora.training.records`.
"""
