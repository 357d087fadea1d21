"""Where anything is written: what a run leaves in its RUN_DIR, and reading it back.

    rundir.py        checking --out, the advisory lock on RUN_DIR, the primary process of a multi-host run
    checkpoint.py    Orbax checkpoints of what training changes (adapters, trained base leaves, optimizer
                     state, meta) and the base they belong to
    artifacts.py     the one loader: open_artifact(a run, a checkpoint step, a PEFT folder, a merged export,
                     a Hub id) -> Artifact (base, adapters with their scales, tokenizer, prompt form, the
                     member chosen); load_checkpoint / load_run
    metrics.py       metrics.jsonl (one row a line) mirrored to TensorBoard, cut back on resume
    tensorboard.py   TensorBoard event files through tensorboardX, cut back to a resumed step

    RUN_DIR/config.yaml, metrics.jsonl, tb/, checkpoints/<step>/{adapter, opt_state, meta}, summary.json

Imports the core and exchange only (a checkpoint names its base and loads it again); nothing of `run`.
"""
