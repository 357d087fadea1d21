"""Runs of the packaged configs, shrunk to seconds, for the command-line tests.

The tests that train in a subprocess use the same settings, so that their compiled programs
come from the session's persistent compilation cache (tests/conftest.py).
"""

import pytest

from jlora.cli import main

# The embedded default's shape of run (random base, byte tokens, 64 positions), 1 layer and 3 steps;
# a large learning rate without warmup so that the adapters and ln_f move visibly.
TINY_DEFAULT = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
    "steps=3",
    "optim.warmup_steps=0",
    "optim.lr=0.05",
    "eval_every=3",
    "checkpoint.every=3",
    "eval_batches=2",
    "exact_match=16",
]


# gpt2_qa on a local tiny checkpoint (conftest's tiny_hf_with_tokenizer: 257 tokens, 512 positions), shrunk.
TINY_QA = ["seq_len=64", "batch_size=4", "steps=2", "eval_batches=1", "exact_match=0", "checkpoint.every=2"]
TINY_QA += ["optim.warmup_steps=0", "optim.lr=0.05"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """RUN_DIR of `jlora train` (the default config, by name) with TINY_DEFAULT."""
    run = tmp_path_factory.mktemp("default_run")
    assert main(["train", "default", *sets(*TINY_DEFAULT), "--out", str(run)]) == 0
    return run
