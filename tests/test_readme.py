"""README's examples run as written.

- every ```python block, in order, in one namespace;
- every ```bash offline block: its `jlora` commands, in order, in one directory (bash expands the
  arguments; the commands then run in this process), `jlora train` shrunk by the overrides of the
  session's tiny default run, whose directory stands in for runs/default: the command finds that
  run finished (its config checked) and the commands after it use it;
- ```bash and ```py blocks show commands and calls that need a network or a trained run, and
  are not run (tests/test_docs.py parses them, and runs the blocks of the guides in docs/).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from jlora.cli import main

from .conftest import TINY_DEFAULT, sets

README = Path(__file__).parent.parent / "README.md"


def blocks(info: str, page: Path = README) -> list[str]:
    """The code blocks of `page` fenced as ```INFO, in order."""
    return re.findall(rf"^```{info}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_readme_examples_run(tmp_path, monkeypatch):
    python = blocks("python")
    assert len(python) >= 2  # the model example and the utilities
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(python):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert namespace["logits"].shape == (1, 4, 1000)  # the model example ran


def shell_commands(block: str, workdir: Path, names: tuple[str, ...] = ("jlora",)) -> list[list[str]]:
    """The block's commands that call one of `names`, as bash expands them, each [name, *args]; none of
    them runs (each is a shell function that records its arguments, in one write: `&` may run two at once)."""
    record = workdir / "commands"
    record.unlink(missing_ok=True)
    stubs = "".join(f'{name}() {{ printf "%s\\0" {name} "$@" "" >> "{record}"; }}\n' for name in names)
    stubs += 'nice() { while [[ "$1" == -* ]]; do shift 2; done; "$@"; }\n'  # nice -n 10 python ...
    subprocess.run(["bash", "-euc", stubs + block], cwd=workdir, check=True, env={**os.environ})
    return [command.split("\0") for command in record.read_text().split("\0\0")[:-1]] if record.exists() else []


def run_offline(block: str, workdir: Path, capsys) -> list[tuple[list[str], str]]:
    """Run a ```bash offline block's `jlora` commands in this process, `jlora train` shrunk to the tiny
    default run's settings; (argv, stdout) of each."""
    ran = []
    for _, *argv in shell_commands(block, workdir):
        extra = sets(*TINY_DEFAULT) if argv[0] == "train" else []
        capsys.readouterr()
        assert main([*argv, *extra]) == 0, f"jlora {' '.join(argv)}: {capsys.readouterr().err[-2000:]}"
        ran.append((argv, capsys.readouterr().out))
    return ran


def test_readme_offline_shell_commands_run(default_run, tmp_path, monkeypatch, capsys):
    offline = blocks("bash offline")
    assert offline, "README has no ```bash offline block"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(default_run, tmp_path / "runs" / "default")
    ran = [command for block in offline for command in run_offline(block, tmp_path, capsys)]
    assert [argv[0] for argv, _ in ran] == ["train", "generate", "export", "export", "generate"]
    asked = ran[1][1]  # the run is asked in its training form
    assert asked.startswith("Question: How many letters are in garden?\nAnswer:")
    assert "\nQuestion: What is 23 plus 19?\nAnswer:" in asked
    assert ran[4][1].startswith("Question: Is 736 even or odd?\nAnswer:")  # the export, the template written out
    assert "resuming at step 3" in ran[0][1]
    assert (tmp_path / "out" / "default_adapter" / "base" / "model.safetensors").exists()
