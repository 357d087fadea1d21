"""The command line: `jlora train | export | generate | diagnose`, thin wiring over the library.

    main.py       the parser; input errors (`jlora.errors.JloraError`) -> one line, exit 2
    train         `jlora train`    -> jlora.training.train
    export.py     `jlora export`   -> jlora.exchange (PEFT folder or merged checkpoint of a run)
    generate.py   `jlora generate` -> jlora.core.generate (a run, a PEFT folder or a checkpoint)
    diagnose.py   `jlora diagnose` -> jlora.research.diagnose

The top layer: it may import every other part of jlora, and nothing imports it.
"""

from jlora.cli.main import build_parser, exit_status, main

__all__ = ["build_parser", "exit_status", "main"]
