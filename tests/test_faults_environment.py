"""The fault catalogue, continued: what the machine does to a command, driven through `jlora` as it happens.

A checkpoint folder that turns read-only or fills up in the middle of a run, output folders that are
read-only or on a full disk, a command killed outright while it writes: each ends in one line on
stderr naming the folder and the reason, with exit status 2 and no traceback, within the time of a
save; nothing is left half-written; a run resumes exactly where its last checkpoint was, and the
next export or combination cleans what a killed one left.

Read-only folders are read-only bind mounts when the tests run as root (whom permissions do not
stop; `chmod` otherwise), full disks small tmpfs mounts; where the machine allows neither, the case
is skipped and says why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jlora.cli import main

from .test_faults import losses, qa_rows, read_only, snapshot, tiny

CONSTANT = ["--set", "optim.schedule=constant", "--set", "checkpoint.max_to_keep=null"]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "2m"):
    """A small tmpfs mounted on `folder` for the block (skips the test where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (as uid {os.geteuid()}): {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)


def fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte, with one file; returns it."""
    filler = folder / ".filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (65536, 4096, 1):  # what a larger block no longer fitted, in smaller ones
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    return filler


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "train.jsonl").write_text(qa_rows(24))
    return root


# The checkpoint folder turns read-only (a read-only bind mount over it) or full (a file fills the tmpfs it is
# on) just before step 3 is saved; the wrapper writes when that save began.
FAULT_AT_SAVE = """
import os, subprocess, sys, time
from pathlib import Path
from jlora.training.records import checkpoint

save = checkpoint.save

def save_with_a_fault(manager, step, *args, **kwargs):
    if step == 3:
        folder = Path(manager.directory)
        if os.environ["JLORA_TEST_FAULT"] == "read_only":
            subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], check=True)
        else:
            with open(folder / ".filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\\0" * 4096)
                except OSError:
                    pass
        Path(os.environ["JLORA_TEST_SAVE_BEGAN"]).write_text(str(time.time()))
    return save(manager, step, *args, **kwargs)

checkpoint.save = save_with_a_fault
from jlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fault", ["read_only", "full"])
def test_a_checkpoint_save_that_fails_mid_run_ends_in_one_line_and_resumes(fault, data, tmp_path):
    """The save of step 3 fails (its folder turned read-only, or full): the run ends at once with one line and
    exit status 2, checkpoints 1 and 2 kept and no partial step-3 folder; once the folder is writable again the
    same command resumes from step 2 and gives an uninterrupted run's losses, bit for bit."""
    run, began = tmp_path / "run", tmp_path / "began"
    args = ["train", *tiny(data), *CONSTANT, "--set", "steps=4", "--set", "checkpoint.every=1"]
    reference = subprocess.Popen([sys.executable, "-m", "jlora.cli", *args, "--out", str(tmp_path / "ref")])
    env = {**os.environ, "JLORA_TEST_FAULT": fault, "JLORA_TEST_SAVE_BEGAN": str(began)}
    with contextlib.ExitStack() as stack:
        if fault == "full":
            stack.enter_context(tmpfs(run / "checkpoints"))
        else:  # the wrapper's read-only bind mount goes, whatever happens
            stack.callback(subprocess.run, ["umount", run / "checkpoints"], capture_output=True)
        command = [sys.executable, "-c", FAULT_AT_SAVE, *args, "--out", str(run)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        ended = time.time()
        if fault == "read_only":
            subprocess.run(["umount", run / "checkpoints"], check=True)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        why = "Read-only file system" if fault == "read_only" else "No space left on device"
        assert errors == [done.stderr.strip().splitlines()[-1]]
        assert errors[0].startswith(
            f"jlora train: error: cannot save the checkpoint of step 3 in {run / 'checkpoints'}"
        )
        assert f"({why}); the newest checkpoint is step 2" in errors[0]
        # Orbax's asynchronous save failed in a thread the process then waited 300 s for; one save takes seconds
        assert ended - float(began.read_text()) < 60
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["1", "2"]
        if fault == "full":
            (run / "checkpoints" / ".filler").unlink()
        assert main([*args, "--out", str(run)]) == 0
    assert reference.wait(timeout=600) == 0
    assert losses(run) == losses(tmp_path / "ref") and sorted(losses(run)) == [1, 2, 3, 4]


def test_a_read_only_checkpoint_folder_is_refused_at_start_up(data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *tiny(data), "--set", "checkpoint.every=1", "--out", str(run)]
    assert main([*args, "--set", "steps=2"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    with read_only(run / "checkpoints"):
        assert main([*args, "--set", "steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"jlora train: error: {run / 'checkpoints'} is not writable; make it writable to resume, or choose another "
        "--out"
    ]
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished run of the tiny model on its random base (so an export or a combination writes base/ too)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *tiny(data), "--set", "steps=1", "--out", str(out)]) == 0
    return out


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {
        "export_peft": ["export", str(run), "--peft", str(out)],
        "export_merged": ["export", str(run), "--merged", str(out)],
        "combine": ["combine", str(run), str(run), "--weights", "0.5", "0.5", "--method", "linear", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["export_peft", "export_merged", "combine"])
def test_output_folders_read_only_or_on_a_full_disk(command, run, tmp_path, capsys):
    """A read-only place is refused before anything is computed; a disk that fills while the folder is written
    ends in one line naming the folder and the reason, and leaves nothing behind."""
    place = tmp_path / "place"
    place.mkdir()
    capsys.readouterr()
    with read_only(place):
        assert main(commands(run, place / "out")[command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot create {place / 'out'}: {place} is not writable; choose another folder" in err[0]
    assert list(place.iterdir()) == []

    with tmpfs(tmp_path / "full", size="256k") as full:
        filler = fill(full)
        before = snapshot(full)
        assert main(commands(run, full / "sub" / "out")[command]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot write {full / 'sub' / 'out'} (No space left on device)" in err[0], err
        assert snapshot(full) == before  # no partial folder, no hidden one, not even sub/
        filler.unlink()


def test_diagnose_evaluate_and_scripts_refuse_a_read_only_out_at_start_up(run, tmp_path, capsys):
    place = tmp_path / "place"
    place.mkdir()
    (tmp_path / "test.txt").write_text("name[A]||A.\n")
    capsys.readouterr()
    with read_only(place):
        assert main(["diagnose", str(run), "--out", str(place / "d")]) == 2
        assert main(["evaluate", str(run), "--data", str(tmp_path / "test.txt"), "--out", str(place / "e")]) == 2
        script = Path(__file__).resolve().parents[1] / "scripts" / "rank_sweep.py"
        done = subprocess.run(
            [sys.executable, str(script), "--quick", "--out", str(place / "s")], capture_output=True, text=True
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"jlora diagnose: error: --out {place / 'd'}: {place} is not writable; choose another folder",
        f"jlora evaluate: error: --out {place / 'e'}: {place} is not writable; choose another folder",
    ]
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"rank_sweep.py: error: --out {place / 's'}: {place} is not writable; choose another folder",
    )
    assert list(place.iterdir()) == []


# SIGKILL at the moment a finished output folder would be renamed into place: every file is written.
KILL_AT_RENAME = """
import os, signal, sys
rename = os.rename

def kill_at_commit(src, dst, *args, **kwargs):
    if os.path.basename(str(src)).startswith(".") and ".tmp-" in os.path.basename(str(src)):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)

os.rename = kill_at_commit
from jlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["export_peft", "export_merged", "combine"])
def test_a_killed_export_or_combination_leaves_debris_the_next_one_cleans(command, run, tmp_path):
    """A writer killed outright leaves its hidden folder (one: no writer's folder inside another's); the same
    command again writes the folder and removes that leftover."""
    args = commands(run, tmp_path / "out")[command]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".out.tmp-") and left.is_dir()
    assert not [p for p in left.rglob("*") if ".tmp-" in p.name]  # one writer: nothing nested
    written = {p.relative_to(left) for p in left.rglob("*")}
    assert main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")} == written
