"""The documentation: its site builds strict and offline, its generated pages cover the code, and
every code block of README.md and docs/*.md is run or checked.

- the site: `mkdocs build --strict` of the repository (warnings are errors), with every web proxy
  pointed at a closed port, so a build that fetched anything would fail; a copy with a dangling
  link and a missing anchor added fails, naming both and nothing else;
- docs/hooks.py's pages: every option of every verb says its default, every config key has a row
  with its default and a description, `jlora.__all__` is listed whole;
- the blocks, as tests/test_readme.py runs README's: in each guide, every ```python block in order
  in one namespace and every ```bash offline block's `jlora` commands, in a directory where
  runs/default is the session's tiny default run; the other ```py blocks must compile, and the
  `jlora` commands of the other ```bash blocks must parse (their scripts must exist).
"""

import ast
import builtins
import doctest
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jlora.cli import build_parser
from jlora.training.run.config import from_dict

from .conftest import unused_port
from .test_readme import README, blocks, run_offline, shell_commands

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", flags=re.S | re.M)


def load_hooks():
    """docs/hooks.py as a module (it needs griffe, of the docs extra)."""
    pytest.importorskip("griffe", reason='the docs extra is not installed (pip install -e ".[docs]")')
    spec = importlib.util.spec_from_file_location("jlora_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of the site in `config_dir`, offline: every proxy is a closed port."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason='the docs extra is not installed (pip install -e ".[docs]")')
    closed = f"http://127.0.0.1:{unused_port()}"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": path, "NO_PROXY": ""}
    env.update({k: closed for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")})
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    return subprocess.run(command, cwd=config_dir, env=env, capture_output=True, text=True)


def test_the_site_builds_strict_and_offline(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    page = lambda uri: (tmp_path / "site" / uri / "index.html").read_text()  # noqa: E731
    assert "Install and test" in page("")  # README
    assert not re.search(r'src="https?:', page("")) and "fonts.googleapis" not in page("")  # nothing fetched
    api = "".join(page(f"api/{name}") for name in ("core-lora", "exchange", "training-run", "training-records"))
    assert 'id="jlora.core.lora.config.LoraConfig"' in api and 'id="jlora.exchange.peft.save_peft"' in api
    assert '<span class="gp">&gt;&gt;&gt; </span>' in page("api/core-lora")  # doctests shown as highlighted code
    assert "jlora generate" in page("cli") and "population.grid" in page("config")
    assert 'href="core-models/#jlora.core.models.gpt2.GPT2"' in page("api")  # the public names link to their pages


def test_a_dangling_link_breaks_the_build(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(DOCS, copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "jlora").symlink_to(ROOT / "jlora")
    with open(copy / "docs" / "faults.md", "a") as page:
        page.write("\nSee [a page that is not there](no-such-page.md) and [a section](training.md#no-such-section).\n")
    result = build(copy, tmp_path / "site")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "'no-such-page.md', but the target is not found" in log and "anchor '#no-such-section'" in log
    assert "Aborted with 2 warnings in strict mode" in log  # the two, and nothing else


def test_every_option_says_its_default():
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    for verb, command in verbs.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert re.search(r"default|required", action.help or ""), f"jlora {verb} {action.option_strings[0]}"
    reference = load_hooks().cli_reference()
    for verb, command in verbs.items():
        assert f"## `jlora {verb}`" in reference
        assert all(option in reference for a in command._actions for option in a.option_strings)


def plain_keys(values: dict, prefix: str = "") -> list[str]:
    """The dotted keys of nested plain values, a mapping that is itself a key's value left whole."""
    keys = []
    for key, value in values.items():
        nested = isinstance(value, dict) and key not in ("random", "grid", "rank_pattern", "alpha_pattern")
        keys += plain_keys(value, f"{prefix}{key}.") if nested else [prefix + key]
    return keys


def cells(row: str) -> list[str]:
    """A Markdown table row's cells; a "|" inside a code span does not split."""
    out: list[str] = []
    for part in row.strip().strip("|").split(" | "):
        if out and out[-1].count("`") % 2:
            out[-1] += " | " + part
        else:
            out.append(part)
    return [c.strip() for c in out]


def test_the_config_reference_has_every_key():
    from jlora.training.run.config import RunConfig
    from jlora.training.run.members import KEYS

    reference = load_hooks().config_reference()
    rows = {row[0].strip("`"): row[1:] for row in map(cells, re.findall(r"^\| `.*\|$", reference, flags=re.M))}
    from jlora.training.run.search import SearchConfig

    keys = plain_keys(RunConfig().to_dict()) + ["population.members", "population.grid"]
    from jlora.core.lora.adalora import AdaLoraConfig

    keys += [f"search.{key}" for key in SearchConfig().__dataclass_fields__]
    keys += [f"adalora.{key}" for key in AdaLoraConfig().__dataclass_fields__]
    keys.remove("population")
    keys.remove("search")
    keys.remove("adalora")
    assert sorted(rows) == sorted(keys)
    assert rows["lora.r"][:3] == ["`int`", "`8`", ""] and rows["steps"][1:3] == ["`100`", "`400`"]  # defaults
    assert rows["eval_batches"][:2] == ["`int | None`", "`null`"]
    assert all(row[-1].strip() for row in rows.values())  # every key described
    assert all(key in rows["population.members"][-1] for key in KEYS)


def test_a_key_without_a_description_fails_the_reference():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Section:
        """A section.

        Attributes:
          a, b: two keys in one entry.
        """

        a: int = 1
        b: int = 2

    @dataclasses.dataclass(frozen=True)
    class Root:
        n: int = 3  # a comment
        # that goes on
        section: Section = Section()
        bare: int = 0

    hooks, values = load_hooks(), {"n": 3, "section": {"a": 1, "b": 2}}
    reference = hooks.config_reference(Root, values, {"n": 4})
    assert "| `n` | `int` | `3` | `4` | a comment that goes on |" in reference
    assert "| `section.b` | `int` | `2` |  | two keys in one entry |" in reference
    with pytest.raises(ValueError, match="config key bare has no description"):
        hooks.config_reference(Root, {**values, "bare": 0}, {})


def test_the_public_names_are_listed_whole():
    import jlora

    listed = re.findall(r"^\| \[`(\w+)`\]\[", load_hooks().public_names(), flags=re.M)
    assert sorted(listed) == sorted(jlora.__all__)


def test_doctests_become_code():
    hooks = load_hooks()
    assert doctest.testmod(hooks).failed == 0  # docs/ is not among the suite's doctest paths
    text = 'Looks up ``x["a"]``::\n\n    x["a"]\n\n>>> x = {"a": 1}\n>>> x["a"]\n1\nAfter.'
    assert hooks.fence_doctests(text) == (
        'Looks up ``x["a"]``:\n\n    x["a"]\n\n```pycon\n>>> x = {"a": 1}\n>>> x["a"]\n1\nAfter.\n```'
    )
    fenced = "```python\n>>> 1\n```"
    assert hooks.fence_doctests(fenced) == fenced


# The code blocks -------------------------------------------------------------------------------


def undefined_names(code: str) -> set[str]:
    """Names `code` reads but never binds (imports, assignments, loop targets), builtins aside."""
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return read - bound


def test_the_model_guide_opens_with_an_example_that_defines_what_it_uses():
    first = blocks("py", DOCS / "library.md")[0]
    assert "input_ids" in first and undefined_names(first) == set()
    assert undefined_names("x = jnp.ones(3)\nmodel.apply(x)") == {"jnp", "model"}  # the check can fail


def check_shell_block(script: str, workdir: Path, capsys) -> int:
    """Every `jlora` command of `script` parses with jlora's own parser; every script it runs exists."""
    commands = shell_commands(script, workdir, names=("jlora", "python", "pip", "mkdocs"))
    for name, *argv in commands:
        if name == "jlora":
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"jlora {' '.join(argv)}: {capsys.readouterr().err[-500:]}")
        elif name == "python" and argv[0].endswith(".py"):
            assert (ROOT / argv[0]).is_file(), f"python {argv[0]}: no such script"
    return len(commands)


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_the_guides_code_runs(page, default_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(default_run, tmp_path / "runs" / "default")
    namespace: dict = {}
    for i, code in enumerate(blocks("python", page)):
        exec(compile(code, f"{page.name} python block {i}", "exec"), namespace)
    for block in blocks("bash offline", page):
        run_offline(block, tmp_path, capsys)


def test_every_code_block_is_run_or_checked(tmp_path, capsys):
    """README's and the guides' blocks by kind: the ones not run are compiled or parsed here (README's
    python and bash offline blocks run in tests/test_readme.py, the guides' above)."""
    count = {"python (run)": 0, "bash offline (run)": 0, "py (compiled)": 0, "bash (parsed)": 0, "shown": 0}
    count["yaml (a run config, validated)"] = 0
    kinds = {"python": "python (run)", "bash offline": "bash offline (run)", "py": "py (compiled)"}
    kinds |= {"bash": "bash (parsed)", "": "shown", "text": "shown", "yaml": "yaml (a run config, validated)"}
    for page in [README, *PAGES]:
        for info, _ in fenced_blocks(page):
            assert info in kinds, f"{page.name}: a block fenced as ```{info}, which no test reads"
            count[kinds[info]] += 1
        for code in blocks("py", page):
            compile(code, f"{page.name} py block", "exec")
        for code in blocks("yaml", page):  # a run config's sections: valid keys, types and values
            from_dict({"steps": 400, **yaml.safe_load(code)})
        check_shell_block("\n".join(blocks("bash", page)), tmp_path, capsys)  # one shell: a variable set stays set
    with capsys.disabled():
        print(f"\ncode blocks of README.md and docs/*.md: {count}")
    assert count["python (run)"] >= 12 and count["bash offline (run)"] >= 2 and count["bash (parsed)"] >= 26
