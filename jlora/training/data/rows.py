"""Fine-tuning data, second stage: `Example`s -> fixed-shape token rows -> the batch of a step.

    examples = read_examples("qa.jsonl")             # or "bundled", or a `datasets` name
    data = tokenize(examples, tokenizer, seq_len=128)  # TokenizedData of (N, T) numpy arrays
    batch = batch_at(data, step, batch_size=8, seed=0) # the batch of global step `step`
    for batch in eval_batches(val_data, 8): ...        # the whole set, in order
    shape_batch(batch, layout)                         # trimmed / packed for a step (batching.py)

One example is one row. GPT-2 has no BOS token (its training documents are separated by
end-of-text), so end-of-text ``e`` opens every row, giving the first token a context to be
predicted from; another ``e`` closes the completion, so the model learns to stop. With prompt
tokens p and completion tokens c, for seq_len T = 8::

    tokens          e  p1 p2 p3 c1 c2 e
    input_ids       e  p1 p2 p3 c1 c2 e  e     (right-padded with e)
    targets         p1 p2 p3 c1 c2 e  e  e     (targets[t] is the token after input_ids[t])
    loss_mask       0  0  0  1  1  1  0  0     (completion and closing e; never prompt or padding)
    attention_mask  1  1  1  1  1  1  0  0

Truncation keeps the prompt whole and cuts the completion's end (and then its closing e):
the model still learns how the answer begins, and the question is never altered. An example
whose prompt alone fills the T input positions would have no target left and is dropped.
`TokenizedData` counts both (``n_truncated``, ``n_dropped``) for the caller to report.

The data position is the step number: `batch_at` is a pure function of (step, seed), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import numpy as np

from jlora.errors import DataError
from jlora.training.data.sources import Example
from jlora.training.data.tokenizer import Tokenizer

ARRAYS = ("input_ids", "targets", "loss_mask", "attention_mask")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedData:
    """Examples as right-padded rows of length T (see the module docstring for one row).

    input_ids: (N, T) int32; targets: (N, T) int32; loss_mask: (N, T) float32;
    attention_mask: (N, T) int32; example_index: (N,) int32, the row's position in the examples
    given to `tokenize` (rows skip dropped examples); n_truncated / n_dropped: examples cut / left out.
    """

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    example_index: np.ndarray
    n_truncated: int = 0
    n_dropped: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The four arrays at rows `index`: a batch {"input_ids", "targets", "loss_mask", "attention_mask"}."""
        return {name: getattr(self, name)[index] for name in ARRAYS}

    def summary(self) -> str:
        """One line for logs, e.g. '1000 examples, 23,512 loss tokens, 0 truncated, 0 dropped'."""
        return (
            f"{len(self)} examples, {int(self.loss_mask.sum()):,} loss tokens, "
            f"{self.n_truncated} truncated, {self.n_dropped} dropped (seq_len {self.seq_len})"
        )


def prompt_tokens(example: Example, tokenizer: Tokenizer) -> list[int]:
    """The context a model generates the completion from: the row's opening token (`Tokenizer.open_ids`; a
    tokenizer without one, as GPT-2's: end-of-text), then the prompt's tokens."""
    opening = getattr(tokenizer, "open_ids", None) or [tokenizer.eos_token_id]
    return [*opening, *tokenizer.encode(example.prompt)]


def tokenize(examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int) -> TokenizedData:
    """Examples -> rows of `seq_len` tokens (layout, truncation and dropping: the module docstring).

    >>> from jlora.training.data.tokenizer import ByteTokenizer
    >>> data = tokenize([Example("ab", "c")], ByteTokenizer(), seq_len=6)
    >>> data.input_ids.tolist(), data.targets.tolist(), data.loss_mask.tolist()
    ([[256, 97, 98, 99, 256, 256]], [[97, 98, 99, 256, 256, 256]], [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id
    rows, index, n_truncated = [], [], 0
    for i, example in enumerate(examples):
        prompt = prompt_tokens(example, tokenizer)
        tokens = prompt + tokenizer.encode(example.completion) + [eos]
        if len(prompt) > seq_len:  # not even the first completion token would be a target
            continue
        if len(tokens) > seq_len + 1:  # T inputs predict T targets: T + 1 tokens fit
            tokens = tokens[: seq_len + 1]
            n_truncated += 1
        rows.append((tokens, len(prompt)))
        index.append(i)
    if not rows:
        raise DataError(f"none of the {len(examples)} examples fits seq_len={seq_len}: every prompt fills it")
    n = len(rows)
    input_ids = np.full((n, seq_len), eos, np.int32)
    targets = np.full((n, seq_len), eos, np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)
    attention_mask = np.zeros((n, seq_len), np.int32)
    for row, (tokens, n_prompt) in enumerate(rows):
        length = len(tokens) - 1
        input_ids[row, :length] = tokens[:-1]
        targets[row, :length] = tokens[1:]
        # targets[t] = tokens[t + 1] is a completion (or closing) token once t + 1 >= n_prompt
        loss_mask[row, n_prompt - 1 : length] = 1.0
        attention_mask[row, :length] = 1
    return TokenizedData(
        input_ids, targets, loss_mask, attention_mask, np.asarray(index, np.int32), n_truncated, len(examples) - n
    )


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Whole batches in one pass; the last ``n_examples % batch_size`` of each epoch's order are skipped."""
    if not 1 <= batch_size <= n_examples:
        raise DataError(f"batch_size {batch_size} must be between 1 and the number of examples ({n_examples})")
    return n_examples // batch_size


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(n)
    order.flags.writeable = False  # shared by the cache
    return order


def batch_indices(n_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of the batch of global step `step` (0-based): (batch_size,) int.

    Epoch e = step // steps_per_epoch orders the rows by ``np.random.default_rng((seed, e))``;
    batches never straddle two epochs, so each row appears at most once per epoch (exactly once
    when batch_size divides n_examples).

    >>> batch_indices(10, 0, 5, seed=0).tolist() + batch_indices(10, 1, 5, seed=0).tolist() == list(
    ...     np.random.default_rng((0, 0)).permutation(10))
    True
    """
    if step < 0:
        raise DataError(f"step must be non-negative, got {step}")
    epoch, i = divmod(step, steps_per_epoch(n_examples, batch_size))
    return _permutation(n_examples, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def batch_at(data: TokenizedData, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The training batch of global step `step`: each array (batch_size, T). A pure function of its arguments."""
    return data.rows(batch_indices(len(data), step, batch_size, seed))


def eval_batches(data: TokenizedData, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, in batches of exactly `batch_size` rows (static shapes for jit).

    The last batch is filled with copies of its last row whose loss_mask is zero: they change
    no masked sum, and, being real rows, they keep every activation finite.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    for start in range(0, n, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        batch = data.rows(index)
        batch["loss_mask"][index != np.arange(start, start + batch_size)] = 0.0
        yield batch
