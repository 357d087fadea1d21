"""`jlora combine SOURCE ... --weights W ... --method M --out DIR`: one adapter from several, as a PEFT folder.

The sources are run directories (a population's members by ``--member K | K,L,... | all``),
checkpoints and PEFT folders (`jlora.training.records.artifacts`), on one base; the combination is
`jlora.core.algebra.combine.combine_adapters` with PEFT's meaning of every method and option (``--density``,
``--r`` for PEFT's svd_rank, ``--majority-sign``, ``--clamp``; ``--seed`` draws DARE's masks). Trained
base leaves (a run's ``ln_f``) are merged as task vectors from the base (`combine_leaves`) and go
out as ``modules_to_save``. The folder is what `jlora export --peft` writes: PEFT loads it, a run on
a random base gets that base in ``DIR/base``, and it carries the first source's tokenizer.

Everything is checked before anything is written: the options against the number of adapters, the
bases, the module sets the method can combine and the rank it can produce; a refusal is one line
and exit status 2, with no folder left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jlora.cli.adapters import open_sources, tokenizer_of
from jlora.core.algebra.combine import check_options, combine_adapters, combine_leaves
from jlora.core.lora.adapter import flatten_adapters
from jlora.exchange.folders import check_new_folder, new_folder
from jlora.exchange.merged import write_merged
from jlora.exchange.peft import write_peft
from jlora.training.records.artifacts import Artifact


def combine_command(args: Any) -> int:
    """``jlora combine SOURCE ... --weights W ... [--method M] [--density D] [--r R] ... --out DIR``."""
    out = check_new_folder(args.out)  # before anything is loaded
    artifacts = open_sources(args.sources, args.member, args.base)
    found = [a.plain() for artifact in artifacts for a in artifact.adapters]  # each on the base as it is
    options = dict(density=args.density, majority_sign_method=args.majority_sign)
    check_options(args.method, len(found), args.weights, r=args.r, clamp=args.clamp, **options)
    key = jax.random.key(args.seed)
    cfg, lora = combine_adapters(
        [f.lora for f in found], args.weights, args.method, r=args.r, clamp=args.clamp, key=key, **options
    )
    leaves, model, params = None, None, None
    if any(f.leaves for f in found) or artifacts[0].base == "random":
        model, params = artifacts[0].load_base()
    if any(f.leaves for f in found):
        leaves = combine_leaves(params, [f.leaves for f in found], args.weights, args.method, key=key, **options)
    write(out, cfg, lora, leaves, artifacts[0], model, params)
    ranks = sorted({adapter["A"].shape[0] for adapter in flatten_adapters(lora).values()})
    print(
        f"{args.method} of {len(found)} adapters (weights {', '.join(f'{w:g}' for w in args.weights)}) -> {out}: "
        f"rank {'/'.join(map(str, ranks))}, scaling 1" + (f", trained {', '.join(sorted(leaves))}" if leaves else "")
    )
    return 0


def write(out: Path, cfg, lora: dict, leaves: dict | None, first: Artifact, model, params) -> None:
    """The combined adapter as a PEFT folder on `first`'s base (a random base written beside it), atomically."""
    tokenizer = tokenizer_of(first)
    random = first.base == "random"
    if random:
        base = str(out.resolve() / "base")
    else:
        base = str(Path(first.base).resolve()) if Path(first.base).is_dir() else first.base  # a folder, or a Hub id
    with new_folder(out) as tmp:  # one writer: the adapter and its base in one folder, renamed once
        write_peft(tmp, lora, cfg, base_model_name_or_path=base, modules_to_save=leaves, tokenizer=tokenizer)
        if random:
            write_merged(tmp / "base", model.config, params, tokenizer=tokenizer)
