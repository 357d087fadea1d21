"""The run behind `jlora train`, in three rooms that follow a row's path::

    data/      where a batch is made:   records -> Examples -> token rows -> the shaped batch of a step
    run/       where an update happens: the run config, the run built from it, the loop and its hooks,
               evaluation, populations, stop requests, `train`
    records/   where anything is written: the run directory and its lock, Orbax checkpoints,
               metrics.jsonl and TensorBoard

`data` and `records` import the core and exchange only (and their own room); `run` composes both.
Nothing here imports research or the command line (tests/test_layers.py checks both, and that no
import cycle forms anywhere in jlora).
"""
