"""Every command reaches a run through the one loader: one Orbax restore of a checkpoint per command, counted."""

import orbax.checkpoint as ocp
import pytest

from jlora.cli import main


@pytest.fixture
def restores(monkeypatch):
    """The number of Orbax restores of a checkpoint's adapter tree (what the one loader reads) since the start."""
    count = []
    original = ocp.StandardCheckpointer.restore

    def counted(self, *args, **kwargs):
        count.append(args[0] if args else kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", counted)
    return count


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{run}", "--peft", "{tmp}/peft"],
        ["export", "{run}", "--merged", "{tmp}/merged"],
        ["generate", "{run}", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "2"],
        ["diagnose", "{run}", "--out", "{tmp}/diagnose"],
    ],
    ids=["export-peft", "export-merged", "generate", "diagnose"],
)
def test_one_restore_per_command(command, default_run, tmp_path, restores, capsys):
    args = [word.replace("{run}", str(default_run)).replace("{tmp}", str(tmp_path)) for word in command]
    assert main(args) == 0
    assert len(restores) == 1, restores


def test_combine_reads_each_checkpoint_once(default_run, population_run, tmp_path, restores, capsys):
    args = ["combine", str(population_run), str(default_run), "--member", "0,2", "--weights", "0.5", "0.3", "0.2"]
    assert main([*args, "--method", "cat", "--out", str(tmp_path / "cat")]) == 0
    assert len(restores) == 2, restores  # two checkpoints, two members of the first from one read
