"""The errors jlora raises for what a user can fix, in one hierarchy.

Every error caused by input (a config value, a data file, a checkpoint folder, a command-line
argument) is a `JloraError`; its message is one line that names the bad value and what would be
valid. The command line prints that line and exits with status 2; anything else is a bug and
keeps its traceback. A run that starts well but cannot go on (a loss that turns non-finite)
is a `RunError`: one line, exit status 1 (130 for a run stopped on request)::

    JloraError                      exit 2
      ConfigError                   a run config, LoraConfig, OptimConfig or GPT2Config value
      DataError                     a data file or dataset (file and line named)
      TokenizerError                a tokenizer that cannot be found or loaded
      CheckpointError               a model, adapter or run checkpoint that cannot be read or used
        BaseMismatchError           an adapter put on a base model it was not trained on
      RunDirError                   a run directory in use, not writable, or holding another run
      UsageError                    a command-line argument
    RunError                        exit 1
      NonFiniteError                the loss or the trained state became NaN or infinite
      Interrupted                   stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint   exit 130

The input errors are also `ValueError`s, so code that catches ValueError keeps working.

>>> issubclass(BaseMismatchError, CheckpointError) and issubclass(ConfigError, ValueError)
True
"""

from __future__ import annotations


def describe(error: BaseException) -> str:
    """An exception in a few words for a one-line message: its type and its message's first line.

    >>> describe(ValueError("bad value\\nmore detail"))
    'ValueError: bad value'
    """
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


class JloraError(Exception):
    """Bad input a user can fix; the message is one line naming the value and what is valid."""


class ConfigError(JloraError, ValueError):
    """A bad configuration value (unknown key, wrong type, impossible value)."""


class DataError(JloraError, ValueError):
    """Data that cannot be read or used; the message names the file (and line) at fault."""


class TokenizerError(JloraError, ValueError):
    """A tokenizer that cannot be found or loaded."""


class CheckpointError(JloraError, ValueError):
    """A checkpoint (model, adapter or run) that cannot be found, read or matched to the model."""


class BaseMismatchError(CheckpointError):
    """An adapter restored onto a base model it was not trained on."""


class RunDirError(JloraError, ValueError):
    """A run directory that cannot be used: in use by another process, unwritable, or another run's."""


class UsageError(JloraError, ValueError):
    """A bad command-line argument (a path, a value)."""


class RunError(RuntimeError):
    """A run that started but cannot continue; nothing bad was saved."""


class NonFiniteError(RunError):
    """The loss or the trained state became NaN or infinite; the run stopped before saving it."""


class Interrupted(RunError):
    """The run stopped on request (SIGINT or SIGTERM) after checkpointing the update it had reached."""
