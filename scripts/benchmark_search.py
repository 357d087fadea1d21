"""A search against the grid it replaces, and against the same successive halving run as separate trial processes.

    python scripts/benchmark_search.py --out runs/bench_search            # the default config's model, 18 members
    python scripts/benchmark_search.py --quick --out runs/bench_quick     # a 1-layer, 32-wide model, 2 members: a check

Three ways to answer "which r, which alpha" on one task, each from scratch, in fresh processes (startup,
model build and compilation count, as they do for a user):

    search   `jlora sweep` of the population with a ``search:`` section: one process
    grid     (a) the exhaustive grid: every member alone to the full budget, one `jlora train` after another
    asha     (b) the search's successive-halving schedule as separate solo trials, one process per trial
             segment, as a Ray Tune ASHA user on one machine runs it: each trial's `jlora train --until RUNG`
             on its own RUN_DIR (resuming its checkpoint), each rung decided by the same rule
             (`jlora.training.run.search.decide`) from the trials' validation losses

Reported for each: wall time, member-steps (updates of one adapter), compile time (tracing, lowering and
XLA compilation, from `jax.monitoring` in every process) and the winner; and whether the search picked the
grid's winner or one within 1 % of its validation loss. Rounds go search, grid, asha strictly in turn on
the shared harness (`harness.alternate`); the load average is read before and after each strategy and
after each round, and the verdict says whether every round was quiet enough to be a result.

The population is ``--population`` (a YAML mapping, as the config's ``population:``; default r in
1, 2, 4, 8, 16, 32 by alpha in r, 2r, 4r: 18 members), the schedule ``--eta`` (3) and ``--rung-every`` (100).
Run it on an idle machine, without a persistent compilation cache (``JAX_COMPILATION_CACHE_DIR`` unset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
POPULATION = "{grid: {r: [1, 2, 4, 8, 16, 32], alpha: [r, 2r, 4r]}}"
QUICK = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, embd_pdrop: 0.0, resid_pdrop: 0.0}",
    "data.buckets=64",  # every batch one shape
    "steps=2",
    "eval_batches=1",
    "exact_match=0",
    "eval.forgetting=null",
    "log_every=1",
]
QUICK_POPULATION = "{grid: {r: [1, 4]}}"
CACHE = "JAX_COMPILATION_CACHE_DIR"
EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="run directories and summary.json go here")
    parser.add_argument("--quick", action="store_true", help="a 1-layer 32-wide model, 2 members, 2 steps")
    parser.add_argument("--config", default="default", help="run config, as `jlora train` (default: default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as `jlora train`")
    parser.add_argument("--population", help=f"the members, a YAML mapping (default {POPULATION})")
    parser.add_argument("--eta", type=int, help="keep ceil(n / eta) at each rung (default 3; --quick 2)")
    parser.add_argument("--rung-every", type=int, help="steps between rungs (default 100; --quick 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three strategies, in turn")
    return parser.parse_args(argv)


# --- one process of a strategy: `jlora` with its compile time recorded -------------------------------------------


def child(report: str, argv: list[str]) -> int:
    """Run ``jlora ARGV`` in this process and write {"compile_s", "wall_s"} to `report`."""
    import jax

    compile_s = [0.0]

    def listen(event: str, seconds: float, **kwargs) -> None:
        if event in EVENTS:
            compile_s[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    from jlora.cli import main

    start = time.perf_counter()
    status = main(argv)
    Path(report).write_text(json.dumps({"compile_s": compile_s[0], "wall_s": time.perf_counter() - start}))
    return status


def jlora(argv: list[str], where: Path) -> dict:
    """One fresh process of ``jlora ARGV`` (its output in ``where.log``): {"compile_s", "wall_s"}."""
    report = where.with_suffix(".time.json")
    with open(where.with_suffix(".log"), "w") as log:
        done = subprocess.run([sys.executable, SCRIPT, "--child", str(report), *argv], stdout=log, stderr=log)
    if done.returncode:
        raise RuntimeError(f"jlora {' '.join(argv[:1])} failed (exit status {done.returncode}); see {log.name}")
    return json.loads(report.read_text())


# --- the strategies ------------------------------------------------------------------------------------------------


class Setup:
    """What the strategies share: the run config's arguments, the members (settings), the schedule."""

    def __init__(self, args: argparse.Namespace):
        from jlora.training.run.config import load_run_config, population_members
        from jlora.training.run.search import rung_steps

        self.sets = [*(QUICK if args.quick else ()), *args.set]
        self.config = args.config
        self.population = args.population or (QUICK_POPULATION if args.quick else POPULATION)
        self.eta = args.eta or (2 if args.quick else 3)
        self.rung_every = args.rung_every or (1 if args.quick else 100)
        self.search = f"{{eta: {self.eta}, rung_every: {self.rung_every}, metric: val_loss}}"
        cfg = load_run_config(self.config, [*self.sets, f"population={self.population}", f"search={self.search}"])
        self.steps, self.members = cfg.steps, population_members(cfg)
        self.rungs = rung_steps(self.rung_every, self.steps)

    def args(self, *more: str) -> list[str]:
        return [self.config, *(x for s in [*self.sets, *more] for x in ("--set", s))]

    def solo(self, k: int) -> list[str]:
        """Member k's own `jlora train` arguments (its r, alpha, rsLoRA, lr, LoRA+ ratio, adapter seed)."""
        m = self.members[k]
        more = [f"lora.r={m.lora.r}", f"lora.alpha={m.lora.alpha}", f"lora.rslora={str(m.lora.rslora).lower()}"]
        more += [f"optim.lr={m.lr}", f"adapter_seed={m.seed}"]
        more += [] if m.loraplus_ratio is None else [f"optim.loraplus_ratio={m.loraplus_ratio}"]
        return self.args(*more)


def val_loss(run_dir: Path, step: int) -> float:
    from jlora.training.records.metrics import read_metrics

    return next(r["val_loss"] for r in read_metrics(run_dir) if r["step"] == step and "val_loss" in r)


class Strategy:
    """A harness system: ``step(i)`` runs the whole strategy afresh in OUT/round<i>/<name>; `results[i]` its figures."""

    name = ""

    def __init__(self, setup: Setup, out: Path):
        self.setup, self.out, self.results = setup, out, {}

    def step(self, i: int) -> float:
        where = self.out / f"round{i}" / self.name
        where.mkdir(parents=True)
        load_before = harness.load_average()
        start = time.perf_counter()
        figures = self.run(where)
        wall = time.perf_counter() - start
        self.results[i] = {"wall_s": wall, "load_before": load_before, "load_after": harness.load_average(), **figures}
        return wall


class Search(Strategy):
    name = "search"

    def run(self, where: Path) -> dict:
        s = self.setup
        run = where / "run"
        t = jlora(["sweep", *s.args(f"population={s.population}", f"search={s.search}"), "--out", str(run)], run)
        summary = json.loads((run / "summary.json").read_text())["search"]
        figures = {"processes": 1, "compile_s": t["compile_s"], "member_steps": summary["member_steps"]}
        return {
            **figures,
            "best": summary["best"],
            "rungs": [{k: r[k] for k in ("step", "kept", "pruned")} for r in summary["rungs"]],
        }


class Grid(Strategy):
    name = "grid"

    def run(self, where: Path) -> dict:
        s, compile_s, final = self.setup, 0.0, {}
        for k in range(len(s.members)):
            compile_s += jlora(["train", *s.solo(k), "--out", str(where / str(k))], where / str(k))["compile_s"]
            final[k] = val_loss(where / str(k), s.steps)
        best = min(final, key=lambda k: (final[k], k))
        return {
            "processes": len(s.members),
            "compile_s": compile_s,
            "member_steps": len(s.members) * s.steps,
            "best": best,
            "val_loss": [final[k] for k in range(len(s.members))],
        }


class Asha(Strategy):
    name = "asha"

    def run(self, where: Path) -> dict:
        from jlora.training.run.search import decide, ranking

        s, compile_s, processes, member_steps = self.setup, 0.0, 0, 0
        alive, previous, rungs = list(range(len(s.members))), 0, []
        for rung in [*s.rungs, s.steps]:
            if len(alive) == 1 and rung < s.steps:  # a lone trial runs to the end, as the search's survivor
                continue
            for k in alive:  # each trial's segment: its own process, resuming its own checkpoint
                trial = where / str(k)
                compile_s += jlora(["train", *s.solo(k), "--until", str(rung), "--out", str(trial)], trial)["compile_s"]
                processes += 1
            member_steps += len(alive) * (rung - previous)
            values = {k: val_loss(where / str(k), rung) for k in alive}
            if rung < s.steps:
                kept, pruned = decide(values, alive, s.eta)
                rungs.append({"step": rung, "kept": kept, "pruned": pruned})
                alive = kept
            previous = rung
        best = ranking(values, alive)[0]
        figures = {"processes": processes, "compile_s": compile_s, "member_steps": member_steps}
        return {**figures, "best": best, "rungs": rungs}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    args = parse_args(argv)
    out = Path(args.out)
    setup = Setup(args)
    cache = "a compilation cache is set (not a fresh user's compile times)" if CACHE in os.environ else "no cache"
    print(
        f"{harness.cpu_name()} | load {harness.load_average():.2f} | {len(setup.members)} members, {setup.steps} "
        f"steps, eta {setup.eta}, rungs {setup.rungs} | {cache}"
    )
    systems = {name: cls(setup, out) for name, cls in (("search", Search), ("grid", Grid), ("asha", Asha))}
    rounds = harness.alternate(systems, range(1, args.rounds + 1))
    per_round = []
    for r in rounds:
        res = {name: system.results[r.index] for name, system in systems.items()}
        grid_loss = res["grid"]["val_loss"]
        best = min(grid_loss)
        picked = grid_loss[res["search"]["best"]]
        per_round.append(
            {
                **res,
                "load": r.load,
                "search_picked_grid_winner": res["search"]["best"] == res["grid"]["best"],
                "search_within_1_percent": picked <= best * 1.01,
                "search_best_grid_val_loss": picked,
                "grid_best_val_loss": best,
                "asha_same_winner": res["asha"]["best"] == res["search"]["best"],
            }
        )
    summary = {
        "members": [m.name for m in setup.members],
        "steps": setup.steps,
        "eta": setup.eta,
        "rung_every": setup.rung_every,
        "rounds": per_round,
        "grid_over_search": harness.ratio(rounds, "grid", "search"),
        "asha_over_search": harness.ratio(rounds, "asha", "search"),
        "load": harness.summary(rounds),
        "verdict": harness.verdict(rounds),
    }
    for name in systems:
        figures = [r[name] for r in per_round]
        print(
            f"{name:>6}: wall {statistics.median(f['wall_s'] for f in figures):.1f} s, "
            f"{figures[-1]['processes']} processes, {figures[-1]['member_steps']} member-steps, "
            f"compile {figures[-1]['compile_s']:.1f} s, best member {figures[-1]['best']} "
            f"| load {figures[-1]['load_before']:.2f} -> {figures[-1]['load_after']:.2f}"
        )
    last = per_round[-1]
    print(
        f"grid / search wall {summary['grid_over_search']:.2f}x (aim >= 4), asha / search "
        f"{summary['asha_over_search']:.2f}x (aim >= 1.5) | search picked the grid's winner: "
        f"{last['search_picked_grid_winner']}, within 1 %: {last['search_within_1_percent']} "
        f"({last['search_best_grid_val_loss']:.4f} vs {last['grid_best_val_loss']:.4f}) "
        f"| asha's winner is the search's: {last['asha_same_winner']}"
    )
    print(summary["verdict"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
