"""A data-to-text test file decoded with an adapter, as the LoRA paper decodes E2E: what `jlora evaluate` runs.

::

    contexts, references = read_references("e2e/test.txt")       # each MR once, first-seen order, its references
    prompts = [run_prompt(c, "e2e", tokenizer)[1] for c in contexts]   # as the run's rows ask: e context e
    outputs = decode_outputs(model, params, tokenizer, prompts, lora=lora,
                             num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=64)
    nlg_metrics.score(outputs, references)                       # BLEU, NIST, METEOR, ROUGE-L, CIDEr

`decode_outputs` sorts the prompts by length, so that a batch wastes little on left padding and the
padded lengths (multiples of 16) stay few, decodes them `batch_size` at a time (the last batch filled
up with repeats, so every batch has one shape and compiles once per padded length), cuts each
output at end-of-text and cleans it as the reference code's ``gpt2_decode.py`` does
(`jlora.training.data.data2text.clean_text`: up to a blank line, stripped). Each row of a batch is
decoded as it would be alone, so the order changes nothing but the speed.

`write_measure_scores_files` writes the two files the challenge's ``measure_scores.py`` reads (what
microsoft/LoRA's ``gpt2_decode.py`` writes): the references of each MR one a line, MRs apart by a
blank line, and one output a line; ``measure_scores.py e2e_ref.txt e2e_pred.txt -p`` then scores the
same outputs with the official script.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jlora.core.decoding.generate import generate
from jlora.training.data.data2text import clean_text


def decode_outputs(
    model,
    params: Mapping,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    lora: Mapping | None = None,
    batch_size: int = 8,
    progress: Callable[[], object] | None = None,
    **options,
) -> list[str]:
    """The cleaned output of each prompt (token ids), in the prompts' order.

    Args:
      model, params, lora: as `jlora.core.decoding.generate.generate` takes them.
      tokenizer: decodes the new tokens; its ``eos_token_id`` ends an output.
      prompts: (N,) token ids, each prompt as the run was trained to read it.
      batch_size: prompts per `generate` call.
      progress: called after each batch (e.g. a progress bar's ``update``).
      options: `generate`'s decoding options (num_beams, length_penalty, no_repeat_ngram_size, max_new_tokens, ...).
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = min(batch_size, len(prompts))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        batch = [prompts[i] for i in rows]
        batch += [batch[-1]] * (size - len(batch))  # one shape for every batch
        out = generate(model, params, batch, lora=lora, eos_token_id=tokenizer.eos_token_id, **options)
        for i, sequence in zip(rows, out.sequences(), strict=False):
            outputs[i] = clean_text(tokenizer.decode(sequence))
        if progress is not None:
            progress()
    return outputs


def write_measure_scores_files(
    outputs: Sequence[str], references: Sequence[Sequence[str]], folder: str | Path
) -> tuple[Path, Path]:
    """(e2e_ref.txt, e2e_pred.txt) in `folder`, as measure_scores.py reads them (its line breaks made spaces)."""
    folder = Path(folder)
    one_line = lambda text: " ".join(text.split())  # noqa: E731
    ref, pred = folder / "e2e_ref.txt", folder / "e2e_pred.txt"
    ref.write_text("".join("".join(one_line(r) + "\n" for r in rs) + "\n" for rs in references), encoding="utf-8")
    pred.write_text("".join(one_line(o) + "\n" for o in outputs), encoding="utf-8")
    return ref, pred
