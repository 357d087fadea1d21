"""Where a batch is made: from a record on disk to the arrays a compiled step reads.

    sources.py     .jsonl / bundled / `datasets` records -> Examples (prompt, completion; the QA template)
    data2text.py   E2E / WebNLG / DART files -> {"context", "completion"} records; a test file's references per MR
    tokenizer.py   byte tokens (offline; exported as an equal GPT2TokenizerFast) or a GPT-2 BPE tokenizer
    rows.py        Examples -> TokenizedData (N, T) rows; batch_at(data, step): the batch of a step
    batching.py    a batch trimmed to length buckets (or packed), its loss positions listed (Layout)
    prompt.py      a prompt in the form a run trained on (what `jlora generate RUN_DIR` feeds)
    config.py      DataConfig: the run config's ``data:`` section

    read_examples ─> tokenize ─> batch_at(step) ─> shape_batch(layout) ─> the step

Every function here is a pure function of its arguments (the step's batch of (step, seed)), so a
resumed run reads exactly the batches an uninterrupted one would. Imports nothing of `run` or `records`.
"""
