"""The ``data:`` section of a run config: where a run's records come from and how its batches are shaped.

>>> DataConfig().buckets, DataConfig(pack=True).pack
('octaves', True)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the records come from and how batches are shaped.

    `train` / `validation`: a .jsonl file, "bundled" (the package's QA set), "bundled:facts" (its real
    facts; "bundled:facts:memorise" for validation on training facts) or a `datasets` name.
    """

    train: str = "bundled"  # the training records
    validation: str | None = "bundled"  # the validation records (None: no evaluation of the task)
    format: str = "auto"  # "qa", "prompt_completion", "text", "data2text"; "auto": from the first record's keys
    # (a .txt file: "e2e"); whole data-to-text files: "e2e" (MR||text lines), "webnlg", "dart" (their JSON)
    tokenizer: str | None = None  # a tokenizer folder, GGUF file or Hub id; "bytes": the offline byte one; None: the
    # model's own
    template: str = "qa"  # question-answer rows as "Question: ...\nAnswer: ..." ("qa"), or in the tokenizer's chat
    # template ("chat": the question as the user's turn, the answer as the assistant's)
    buckets: int | str = "octaves"  # batch lengths round up: "octaves" (multiples of 8 up to 64, then 4
    # lengths per doubling: padding under 25 %, few compiled shapes), N (multiples of N), "pow2", "none" (seq_len)
    pack: bool = False  # several rows per sequence (attention kept within each row)
