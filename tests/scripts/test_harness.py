"""scripts/harness.py: strict turns, per-round ratios, the load verdict, and a worker process's round trip."""

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the benchmark scripts import it by name
    spec.loader.exec_module(module)
    return module


harness = load("harness")


class Clock:
    """A system whose round i takes `seconds[i]`, recording the order it was stepped in."""

    def __init__(self, name, seconds, log):
        self.name, self.seconds, self.log = name, seconds, log

    def step(self, i):
        self.log.append((self.name, i))
        return self.seconds[i]


def test_the_docstrings_examples():
    assert doctest.testmod(harness).failed == 0


def test_systems_step_strictly_in_turn_and_ratios_are_per_round(monkeypatch):
    loads = iter([0.5, 3.0])
    monkeypatch.setattr(harness, "load_average", lambda: next(loads))
    log = []
    systems = {"a": Clock("a", {0: 9.0, 1: 2.0, 2: 6.0}, log), "b": Clock("b", {0: 9.0, 1: 1.0, 2: 1.0}, log)}
    rounds = harness.alternate(systems, [1, 2], warmup=[0], show=None)
    assert log == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [r.seconds for r in rounds] == [{"a": 2.0, "b": 1.0}, {"a": 6.0, "b": 1.0}]  # warm-up not kept
    assert harness.ratio(rounds, "a", "b") == 4.0  # median of 2 and 6: not the ratio of medians (8 / 1)
    s = harness.summary(rounds, cores=2)
    assert (s["quiet"], s["max_load"], s["limit"], s["loads"]) == (False, 3.0, 2.5, [0.5, 3.0])
    assert s["verdict"].startswith("NOT a result: the load reached 3.00") and "0.50 over" in s["verdict"]
    assert harness.summary(rounds[:1], cores=2)["quiet"] and harness.summary([], cores=2)["quiet"] is False


def test_a_worker_process_answers_each_round(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "from harness import serve\n"
        "class S:\n    def step(self, i):\n        return i / 10\n"
        "sys.exit(serve(S, info=lambda s: {'kind': 'test'}))\n"
    )
    worker = harness.Worker(str(script), "w")
    assert worker.info == {"ready": True, "kind": "test"}
    assert [worker.step(i) for i in (3, 5)] == [0.3, 0.5]
    end = worker.finish()
    assert end["kind"] == "test" and end["peak_rss_mb"] > 0 and worker.process.returncode == 0


def test_cpu_name_names_the_vector_units():
    name = harness.cpu_name()
    assert "AVX" in name and "AMX" in name and name.endswith("cores")


@pytest.mark.parametrize("bad", [["--variant", "nocolon"], ["--peft", "float16"]])
def test_benchmark_arguments_are_checked(bad, capsys):
    with pytest.raises(SystemExit) as e:
        load("benchmark").main(["--quick", *bad])
    assert e.value.code == 2
