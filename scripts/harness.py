"""The benchmarks' one harness: systems that step strictly in turn, per-round ratios, the load beside every round.

Every benchmark in `scripts/` compares systems the same way::

    systems = {"jlora": Worker(__file__, "jlora", argv), "peft": Worker(__file__, "peft", argv)}
    rounds = alternate(systems, range(1, n + 1), warmup=[0])   # A, B, A, B, ... each round on the same work
    ratio(rounds, "peft", "jlora")                             # median over rounds of peft_s / jlora_s
    print(verdict(rounds))                                     # idle enough to be a result, or by how much not

A *system* is anything with ``step(i) -> seconds``: a `Worker` (a persistent process of the same
script, started with ``--worker NAME`` and answering one JSON line per step, so each system has
its own interpreter, threads and compiled programs) or an in-process object. The worker side is
`serve`: it builds its system once, prints ``{"ready": true, ...info}``, then times one step per
line it reads. Timing inside the worker leaves the pipe's latency out.

Only idle figures are results: a round is *quiet* when the 1-minute load average read after it is
below the number of cores plus 0.5. `verdict` says whether every round was, and otherwise by how
much the busiest one was over; the JSON summary carries the same (`summary`).

>>> r = [Round(1, {"a": 2.0, "b": 1.0}, 0.4), Round(2, {"a": 3.0, "b": 1.0}, 0.6)]
>>> ratio(r, "a", "b"), summary(r, cores=2)["quiet"]
(2.5, True)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


class System(Protocol):
    def step(self, i: int) -> float:
        """Do round i's work; return its seconds (the work alone, timed where it runs)."""
        ...


@dataclass(frozen=True)
class Round:
    """One round: each system's seconds, and the 1-minute load average read when the round ended."""

    index: int
    seconds: dict[str, float]
    load: float


def add_model_arguments(parser, *, n_layer: int = 12, n_embd: int = 768, n_head: int = 12, vocab: int = 50257) -> None:
    """--n-layer, --n-embd, --n-head, --vocab (a random GPT-2's shape; GPT-2 small's by default) and --r."""
    parser.add_argument("--n-layer", type=int, default=n_layer)
    parser.add_argument("--n-embd", type=int, default=n_embd)
    parser.add_argument("--n-head", type=int, default=n_head)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--r", type=int, default=8, help="LoRA's rank (alpha = 2r)")


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def cpu_name() -> str:
    """The CPU's model name and its vector / matrix units (from /proc/cpuinfo), e.g. 'AMD EPYC (AVX-512, no AMX)'."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    units = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]
    units.append("AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16")
    units.append("AMX" if "amx_tile" in flags else "no AMX")
    return f"{model} ({', '.join(units)}), {os.cpu_count()} cores"


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of `fn` (which must wait for its own result)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the worker side ----------------------------------------------------------------------------------------------


def serve(build: Callable[[], System], info: Callable[[System], dict] | None = None) -> int:
    """Run a worker: build the system, announce it, then answer each line ``i`` with its seconds and
    ``done`` with the final info (peak RSS included)."""
    import warnings

    warnings.filterwarnings("ignore")  # libraries' notices are not the benchmark's business
    system = build()
    extra = info(system) if info else {}
    print(json.dumps({"ready": True, **extra}), flush=True)
    for line in sys.stdin:
        if line.strip() == "done":
            break
        print(json.dumps({"seconds": system.step(int(line))}), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    print(json.dumps({"peak_rss_mb": peak, **(info(system) if info else {})}), flush=True)
    return 0


class Worker:
    """A persistent worker process: ``python SCRIPT --worker NAME *argv``, stepped one line at a time.

    `info` is what the worker announced when ready (built and compiled); `ready_s` how long that took.
    """

    def __init__(self, script: str, name: str, argv: Iterable[str] = (), env: Mapping[str, str] | None = None):
        command = [sys.executable, script, *argv, "--worker", name]
        self.name = name
        start = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.info = self._read()
        self.ready_s = time.perf_counter() - start

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker stopped (exit status {self.process.wait()})")
        return json.loads(line)

    def step(self, i: int) -> float:
        self.process.stdin.write(f"{i}\n")
        self.process.stdin.flush()
        return self._read()["seconds"]

    def finish(self) -> dict:
        """Stop the worker; its final info (peak RSS and what it reports)."""
        self.process.stdin.write("done\n")
        self.process.stdin.flush()
        out = self._read()
        self.process.wait()
        return out


# --- the comparison -----------------------------------------------------------------------------------------------


def alternate(
    systems: Mapping[str, System],
    rounds: Iterable[int],
    *,
    warmup: Iterable[int] = (),
    show: Callable[[str], None] | None = print,
) -> list[Round]:
    """Step every system once per round, strictly in turn, in the mapping's order; round i does work i.

    `warmup` rounds are stepped first and not kept (first-run allocations, lazy compilation).
    `show` gets one line per round with each system's seconds and the load.
    """
    for i in warmup:
        for system in systems.values():
            system.step(i)
    out = []
    for i in rounds:
        seconds = {name: system.step(i) for name, system in systems.items()}
        out.append(Round(i, seconds, load_average()))
        if show is not None:
            figures = ", ".join(f"{name} {s:.3f} s" for name, s in seconds.items())
            show(f"  round {i}: {figures} | load {out[-1].load:.2f}")
    return out


def ratio(rounds: list[Round], slower: str, faster: str) -> float:
    """The median over rounds of ``seconds[slower] / seconds[faster]`` (how many times faster `faster` is)."""
    return statistics.median(r.seconds[slower] / r.seconds[faster] for r in rounds)


def median_seconds(rounds: list[Round], name: str) -> float:
    return statistics.median(r.seconds[name] for r in rounds)


def summary(rounds: list[Round], cores: int | None = None) -> dict:
    """{"quiet": every round's load below cores + 0.5, "verdict": one line saying so, "max_load", "limit",
    "cores", "loads", "cpu"}: what a benchmark's JSON carries beside its figures."""
    cores = cores or os.cpu_count() or 1
    loads = [r.load for r in rounds]
    limit, top = cores + 0.5, max(loads, default=0.0)
    quiet = bool(loads) and top < limit
    if quiet:
        line = f"a result: every round's load below {limit:.1f} ({cores} cores + 0.5), at most {top:.2f}"
    else:
        line = (
            f"NOT a result: the load reached {top:.2f} against a limit of {limit:.2f} ({cores} cores + 0.5), "
            f"{top - limit:.2f} over; rerun on a quiet machine"
        )
    return {
        "quiet": quiet,
        "verdict": line,
        "max_load": top,
        "limit": limit,
        "cores": cores,
        "loads": loads,
        "cpu": cpu_name(),
    }


def verdict(rounds: list[Round], cores: int | None = None) -> str:
    """One line: whether the comparison is a result (every round quiet), or by how much the load was over.

    >>> verdict([Round(1, {}, 3.1)], cores=2)
    'NOT a result: the load reached 3.10 against a limit of 2.50 (2 cores + 0.5), 0.60 over; rerun on a quiet machine'
    """
    return summary(rounds, cores)["verdict"]
