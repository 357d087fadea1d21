"""What the commands open, through the one loader (`jlora.training.records.artifacts.open_artifact`), and the
two things an artifact needs from the data room to be asked questions: its tokenizer and its prompt form.

    artifacts = open_sources(["runs/a", "out/b_adapter"], member="all", base=None)   # checked: one base
    tokenizer = tokenizer_of(artifacts[0], override=None)
    prompt = prompt_form(artifacts[0], tokenizer, raw=False)     # text -> (text as the model reads it, ids)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from jlora.cli.members import member_text
from jlora.errors import TokenizerError, UsageError
from jlora.training.data.config import DataConfig
from jlora.training.data.prompt import data_format, run_prompt
from jlora.training.data.tokenizer import load_tokenizer
from jlora.training.records.artifacts import Artifact, MemberChoice, check_same_base, open_artifact


def open_sources(sources: Sequence[str], member: MemberChoice = None, base: str | None = None) -> list[Artifact]:
    """Each source opened (`member` picks a population's adapters), each holding an adapter, all on one base.

    A `member` that picks nothing (no source is a population run) is refused rather than ignored.
    """
    artifacts = [open_artifact(source, member=member, base=base) for source in sources]
    for artifact in artifacts:
        if not artifact.adapters:
            raise UsageError(f"{artifact.source} holds no adapter (give run directories, checkpoints or PEFT folders)")
    if member is not None and not any(a.meta and "member" in a.meta for x in artifacts for a in x.adapters):
        raise UsageError(
            f"--member {member_text(member)}: none of {', '.join(map(str, sources))} is a population run, whose "
            "members it picks; leave --member out"
        )
    check_same_base(artifacts)
    return artifacts


def tokenizer_of(artifact: Artifact, override: str | None = None) -> Any:
    """The tokenizer `artifact`'s adapters trained with (`override` instead); None when there is none to be found
    (a base checkpoint without tokenizer files)."""
    try:
        return load_tokenizer(override or artifact.tokenizer)
    except TokenizerError:
        if override is not None:
            raise
        return None


def prompt_form(artifact: Artifact, tokenizer: Any, raw: bool = False) -> Callable[[str], tuple[str, list[int]]]:
    """``prompt(text) -> (text as the model reads it, token ids)``: a run's training form, else as written."""
    if raw or artifact.kind != "run":
        return lambda text: (text, tokenizer.encode(text))
    data = run_data(artifact.source / "config.yaml")
    fmt = data_format(data)
    if data.template == "chat" and fmt == "qa":  # the question is shown, not the whole chat turn around it
        return lambda text: (f"{text}\n", run_prompt(text, fmt, tokenizer, data.template)[1])
    return lambda text: run_prompt(text, fmt, tokenizer, data.template)


def run_data(config_file) -> DataConfig:
    """The ``data`` section of a run's saved config.yaml, read without checking that its files still exist."""
    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in names})
