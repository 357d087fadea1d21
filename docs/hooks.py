"""The documentation site's build hooks: the pages made from the code, and doctests shown as code.

mkdocs.yml loads this file twice: as MkDocs hooks (``hooks:``), which add the pages that are made
from the code at build time, so none of them can go stale, and as a griffe extension of
mkdocstrings (`Doctests`), which renders the docstrings' doctests as code::

    README.md                    -> index.md       the front page, its ``docs/`` links made site-relative
    jlora.cli.build_parser()     -> cli.md         every verb's --help, verbatim
    RunConfig's fields           -> config.md      every config key: type, default, what it does
    jlora.__all__                -> api/index.md   the public names, each linked to its reference

A key's description is its class docstring's ``Attributes:`` entry, else the comment on its
field's line (and the comment lines right after it); a key with neither fails `config_reference`,
so a new key cannot reach the site undocumented.

>>> fence_doctests("Text::\\n\\n>>> 1 + 1\\n2\\n\\nMore.").splitlines()
['Text:', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import griffe
import yaml

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_NAMES = "<!-- the public names, generated from jlora.__all__ -->"
_FENCE = re.compile(r"^\s*```")


def fence_doctests(text: str) -> str:
    """Doctest runs (a ``>>>`` line to the next blank line) as ```pycon blocks; a closing ``::`` as ``:``.

    griffe reads ``>>>`` as examples only under an "Examples:" heading; jlora's docstrings put
    them in their prose, where Markdown would join the lines and read ``x["a"]["b"]`` as links.
    """
    out, lines, i, fenced = [], text.split("\n"), 0, False
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            fenced = not fenced
        if not fenced and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        if not fenced and line.endswith("::") and not line.endswith(":::"):
            line = line[:-1]  # reStructuredText's literal-block marker; Markdown shows it as written
        out.append(line)
        i += 1
    return "\n".join(out)


class Doctests(griffe.Extension):
    """A griffe extension: every docstring through `fence_doctests`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)


# The front page -------------------------------------------------------------------------------


def front_page(readme: str) -> str:
    """README as the site's index page: links into ``docs/`` become relative to the site's root."""
    return re.sub(r"\]\(docs/", "](", readme)


# The command line ----------------------------------------------------------------------------


def cli_reference(width: int = 100) -> str:
    """``jlora --help`` and every verb's ``--help`` (at a fixed `width`), as one Markdown page."""
    from jlora.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    parts = [
        "# Command line\n",
        "Every verb's `--help`, as `jlora` prints it (made from its parser when the site is built).\n",
    ]
    for name, command in {"jlora": parser, **{f"jlora {verb}": p for verb, p in verbs.items()}}.items():
        command.formatter_class = functools.partial(command.formatter_class, width=width)
        parts.append(f"## `{name}`\n\n```text\n{command.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


# The config keys ----------------------------------------------------------------------------


def attribute_docs(cls: type) -> dict[str, str]:
    """{field: text} from the ``Attributes:`` section of `cls`'s docstring (``a, b: text`` gives both)."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.M)
    if section is None:
        return {}
    entries: dict[str, str] = {}
    body = textwrap.dedent(section.group(1))
    for entry in re.split(r"\n(?=\S)", body.strip()):
        names, _, text = entry.partition(":")
        for name in names.split(","):
            entries[name.strip()] = " ".join(text.split())
    return entries


def comment_docs(cls: type) -> dict[str, str]:
    """{field: text} from the comment on each field's line of `cls`'s source, with the comment-only
    lines that follow it (a comment that goes on)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    code = {i for i, line in enumerate(source.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and node.lineno in comments:
            line, text = node.lineno, [comments[node.lineno]]
            while line + 1 in comments and line + 1 not in code:
                line += 1
                text.append(comments[line])
            docs[node.target.id] = " ".join(text)
    return docs


def _section_class(tp: typing.Any) -> type | None:
    """The dataclass a field holds (through ``X | None``), or None for a plain value."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def _value(value: typing.Any) -> str:
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip() + "`"


def _cell(text: str) -> str:
    """`text` in a table cell: a "|" escaped, except in a code span (where the table does not split)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


_HEADER = "| key | type | default | embedded default | what it does |\n| --- | --- | --- | --- | --- |"


def _rows(cls: type, prefix: str, values: dict, given: dict) -> tuple[list[str], list[tuple]]:
    """The table rows of `cls`'s plain keys, and its sections (dataclass fields) for tables of their own."""
    docs = {**comment_docs(cls), **attribute_docs(cls)}
    hints, rows, sections = typing.get_type_hints(cls), [], []
    for f in dataclasses.fields(cls):
        if f.name not in values:  # derived, not a key (optim.total_steps is the run's steps)
            continue
        key, section = prefix + f.name, _section_class(hints[f.name])
        if section is not None:  # an optional section (None by default) is shown at its own defaults
            own = values[f.name]
            own = json.loads(json.dumps(dataclasses.asdict(section()))) if own is None else own
            sections.append((key, section, own, given.get(f.name) or own, docs.get(f.name)))
            continue
        if not docs.get(f.name):
            raise ValueError(f"config key {key} has no description: give {cls.__name__}.{f.name} a comment")
        theirs = given.get(f.name, values[f.name])
        changed = _value(theirs) if theirs != values[f.name] else ""
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))  # as written
        cells = (f"`{key}`", f"`{kind}`", _value(values[f.name]), changed, docs[f.name].removesuffix("."))
        rows.append("| " + " | ".join(map(_cell, cells)) + " |")
    return rows, sections


def config_reference(root: type | None = None, defaults: dict | None = None, embedded: dict | None = None) -> str:
    """Every key of a run config: its type, default and what it does, a table per section.

    `root` is `RunConfig` unless given (with `defaults`, its plain values, and `embedded`, those of
    the packaged default config).

    Raises:
      ValueError: a key has no description (neither an ``Attributes:`` entry nor a comment).
    """
    if root is None:
        from jlora.training.run.config import DEFAULT_CONFIG, RunConfig, load_run_config

        root, defaults, embedded = RunConfig, RunConfig().to_dict(), load_run_config(DEFAULT_CONFIG).to_dict()
    parts = [
        "# Config keys\n",
        "Every key a run config can set (made from `RunConfig`'s fields and their docstrings when the site is "
        "built). A config file gives any of them in YAML; `--set KEY=VALUE` sets one on the command line "
        "(dotted keys, the value read as YAML). *default* is the value a key takes when a config leaves it "
        "out; *embedded default* is what `jlora train` with no config file (`jlora/configs/default.yaml`) "
        "sets instead, where it differs.\n",
    ]
    top, queue = _rows(root, "", defaults, embedded)
    parts += ["## Top level\n", _HEADER, *top, ""]
    while queue:
        key, cls, values, given, comment = queue.pop(0)
        rows, nested = _rows(cls, key + ".", values, given)
        summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        intro = [f"`{key}`: {comment}.\n"] if comment else []
        parts += [f"## `{key}`\n", *intro, f"{summary} (`{cls.__module__}.{cls.__qualname__}`)\n", _HEADER, *rows, ""]
        queue += nested
    return "\n".join(parts)


# The public names ----------------------------------------------------------------------------


def public_names(init: Path = ROOT / "jlora" / "__init__.py") -> str:
    """`jlora.__all__` as Markdown: its groups (the comments in the list), each name linked to the
    place it is documented (where it is defined), with its summary line."""
    import jlora

    source = init.read_text()
    parts = []
    for line in source[source.index("__all__ = [") :].splitlines()[1:]:
        line = line.strip()
        if line.startswith("#"):
            group = line.lstrip("# ")
            parts += ["", f"## {group[0].upper()}{group[1:]}", "", "| name | |", "| --- | --- |"]
        elif line.startswith('"'):
            name = line.strip('",')
            obj = getattr(jlora, name)
            summary = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
            parts.append(f"| [`{name}`][{obj.__module__}.{obj.__qualname__}] | {_cell(_escape_brackets(summary))} |")
        elif line.startswith("]"):
            break
    return "\n".join(parts) + "\n"


def _escape_brackets(text: str) -> str:
    """A summary safe in Markdown: ``x["a"]`` is not a reference link."""
    return text.replace("[", "\\[").replace("]", "\\]")


# MkDocs hooks ---------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    pages = {
        "index.md": front_page((ROOT / "README.md").read_text()),
        "cli.md": cli_reference(),
        "config.md": config_reference(),
    }
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = re.sub(r"^(\s*```\w+) offline$", r"\1", markdown, flags=re.M)  # a word the tests read, not a fence's
    if PUBLIC_NAMES in markdown:
        markdown = markdown.replace(PUBLIC_NAMES, public_names())
    return markdown
