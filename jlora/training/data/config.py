"""The ``data:`` section of a run config: where a run's records come from and how its batches are shaped.

>>> DataConfig().buckets, DataConfig(pack=True).pack
(64, True)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`train` / `validation`: a .jsonl file, "bundled" (the package's QA set) or a `datasets` name."""

    train: str = "bundled"
    validation: str | None = "bundled"
    format: str = "auto"
    tokenizer: str | None = None  # None: the model's own; "bytes": the offline byte tokenizer
    buckets: int | str = 64  # batch lengths round up to multiples of this, or "pow2", or "none" (seq_len)
    pack: bool = False  # several rows per sequence (attention kept within each row)
