"""A population of 8 adapters in one compiled step against the same 8 runs one after another.

    python scripts/benchmark_population.py                 # the default config's model and run (400 steps)
    python scripts/benchmark_population.py --steps 100     # shorter
    python scripts/benchmark_population.py --quick         # a 1-layer, 32-wide model, 2 members: seconds (the tests)

The members are a rank sweep at two learning rates (r in 1, 2, 4, 8 by lr in the config's and
3 times it, alpha = 2r), on the embedded default run: its 4-layer, 128-wide GPT-2, its data
(batch 16 x 64 byte tokens), optimizer and steps (``--config`` / ``--set`` as `jlora train`).
Three measurements, in one invocation:

    end to end   `fit_population` of the 8 against `fit` of each in turn (what a sweep costs:
                 initialisation, compilation and every step), wall clock
    compile      lowering + XLA compilation of the population's step, and of each solo step
    per step     the population's step and the solo steps taken in turn, round after round
                 (P, s1..s8, P, s1..s8, ...; `scripts/harness.py`): the median over rounds of (sum
                 of solo steps) / (population step), so a change in the machine's load hits both
                 sides alike, with the load beside every round and the verdict on it

The two sides share this process (one base in memory, the same batches), so the end-to-end and
compile figures are taken one after the other: read them with the load printed beside them.
"""

from __future__ import annotations

import argparse
import time

import jax
from harness import alternate, cpu_name, load_average, median_seconds, ratio, summary, verdict

from jlora.core.update.step import step_inputs
from jlora.research import experiments as ex
from jlora.training.data.rows import batch_at
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run config (default: the embedded default run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as `jlora train`")
    parser.add_argument("--steps", type=int, help="steps of each run (default: the config's)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of the per-step comparison")
    parser.add_argument("--members", type=int, default=8, help="the first K of the 8 members (default 8)")
    parser.add_argument("--quick", action="store_true", help="a 1-layer, 32-wide model, 2 members, 3 steps (a check)")
    args = parser.parse_args(argv)
    if args.quick:
        args.set = [*QUICK, *args.set]
        args.members, args.rounds = 2, 1
    return args


# --quick: the research scripts' tiny model, a few steps and no exact match
QUICK = (*ex.QUICK, "steps=3", "eval_batches=1", "exact_match=0")


def members_of(cfg) -> list:
    """8 members: r in 1, 2, 4, 8 at lr and 3 lr, alpha = 2r."""
    return [ex.member(cfg, r=r, alpha=2.0 * r, lr=x * cfg.optim.lr) for x in (1.0, 3.0) for r in (1, 2, 4, 8)]


def solo_runner(task, m) -> ex.Runner:
    """Member `m` alone, as `fit_member` builds it."""
    cfg = ex.member_run(task.cfg, m)
    variables = ex.lora_variables(task, m.lora, seed=m.seed)
    return ex.solo_runner(task, variables, ex.lora_mask(variables, cfg), cfg, m.lora)


def compile_seconds(runner: ex.Runner, batch) -> float:
    """Lowering and XLA compilation of one step, timed on their own (ahead of time)."""
    state = runner.state
    start = time.perf_counter()
    args = (state.step, state.trainable, state.opt_state, state.frozen, step_inputs(batch), runner.rng)
    runner.step.compiled.lower(*args).compile()
    return time.perf_counter() - start


class Steps:
    """Runners stepped together on the batch of round i: ``step(i) -> seconds`` of all of them (one system)."""

    def __init__(self, runners: list[ex.Runner], task, cfg):
        self.runners, self.task, self.cfg = runners, task, cfg

    def step(self, i: int) -> float:
        batch = batch_at(self.task.train, i, self.cfg.batch_size, self.cfg.seed)
        total = 0.0
        for j, runner in enumerate(self.runners):
            start = time.perf_counter()
            state, metrics = runner.step(runner.state, batch, runner.rng)
            jax.block_until_ready(metrics)
            total += time.perf_counter() - start
            self.runners[j] = runner._replace(state=state)
        return total


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = [*args.set, *([f"steps={args.steps}"] if args.steps else [])]
    cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
    task = ex.load_task(cfg)
    members = members_of(cfg)[: args.members]
    print(
        f"{cpu_name()} | load {load_average():.2f} | {cfg.model.name} {cfg.model.random} | {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens | {len(members)} members: {', '.join(m.name for m in members)}"
    )

    start = time.perf_counter()
    ex.fit_population(task, members)
    population_e2e = time.perf_counter() - start
    solo_e2e = []
    for m in members:
        start = time.perf_counter()
        ex.fit_member(task, m)
        solo_e2e.append(time.perf_counter() - start)
    e2e = sum(solo_e2e) / population_e2e
    print(
        f"end to end: population {population_e2e:.1f} s, solo runs {sum(solo_e2e):.1f} s "
        f"({', '.join(f'{t:.1f}' for t in solo_e2e)}): {e2e:.2f}x | load {load_average():.2f}"
    )

    batch = batch_at(task.train, 0, cfg.batch_size, cfg.seed)
    population, _ = ex.population_runner(task, members, cfg)
    solos = [solo_runner(task, m) for m in members]
    pop_compile = compile_seconds(population, batch)
    solo_compile = [compile_seconds(runner, batch) for runner in solos]
    print(f"compile: population {pop_compile:.1f} s, solo steps {sum(solo_compile):.1f} s | load {load_average():.2f}")

    systems = {"population": Steps([population], task, cfg), "solo": Steps(solos, task, cfg)}
    rounds = alternate(systems, range(1, args.rounds + 1), warmup=[0])  # warm-up: the jit's own compilation
    per_step = ratio(rounds, "solo", "population")
    pop_ms, solo_ms = median_seconds(rounds, "population") * 1e3, median_seconds(rounds, "solo") * 1e3
    print(
        f"per step: population {pop_ms:.1f} ms, solo steps {solo_ms:.1f} ms: {per_step:.2f}x "
        f"(median of {args.rounds} rounds) | {verdict(rounds)}"
    )
    return {
        "end_to_end": {"population_s": population_e2e, "solo_s": solo_e2e, "ratio": e2e},
        "compile": {"population_s": pop_compile, "solo_s": solo_compile},
        "per_step": {"population_ms": pop_ms, "solo_ms": solo_ms, "ratio": per_step, "load": summary(rounds)},
    }


if __name__ == "__main__":
    main()
