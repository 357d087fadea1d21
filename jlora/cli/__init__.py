"""The command line: `jlora train | export | generate | evaluate | combine | diagnose`, thin wiring over the library.

    main.py       the parser; input errors (`jlora.errors.JloraError`) -> one line, exit 2
    train         `jlora train`    -> jlora.training.run.train (a config file or a packaged config's name)
    export.py     `jlora export`   -> jlora.exchange (PEFT folder, with a random base beside it, or merged
                                      checkpoint of a run; either with the run's tokenizer)
    generate.py   `jlora generate` -> jlora.core.decoding.generate (a run, in its training prompt form; a PEFT
                                      folder or a checkpoint; several adapters side by side, jlora.core.algebra.mixed)
    evaluate.py   `jlora evaluate` -> jlora.research.nlg_eval and nlg_metrics (a data-to-text test file decoded by
                                      beam search with a run's adapter, scored as the E2E challenge scores)
    combine.py    `jlora combine`  -> jlora.core.algebra.combine (PEFT's combination types), a PEFT folder
    adapters.py   the adapters a source holds (runs, checkpoints, PEFT folders) and their base
    members.py    --member K | K,L,... | all, resolved in one place
    diagnose.py   `jlora diagnose` -> jlora.research.diagnose

The top layer: it may import every other part of jlora, and nothing imports it.
"""

from jlora.cli.main import build_parser, exit_status, main

__all__ = ["build_parser", "exit_status", "main"]
