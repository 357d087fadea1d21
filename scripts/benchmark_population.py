"""A population of 8 adapters in one compiled step against the same 8 runs one after another.

    python scripts/benchmark_population.py                 # the default config's model and run (400 steps)
    python scripts/benchmark_population.py --steps 100     # shorter
    python scripts/benchmark_population.py --set "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}"

The members are a rank sweep at two learning rates (r in 1, 2, 4, 8 by lr in the config's and
3 times it, alpha = 2r), on the embedded default run: its 4-layer, 128-wide GPT-2, its data
(batch 16 x 64 byte tokens), optimizer and steps (``--config`` / ``--set`` as `jlora train`).
Three measurements, in one invocation:

    end to end   `fit_population` of the 8 against `fit` of each in turn (what a sweep costs:
                 initialisation, compilation and every step), wall clock
    compile      lowering + XLA compilation of the population's step, and of each solo step
    per step     the population's step and the 8 solo steps taken in turn, round after round
                 (P, s1..s8, P, s1..s8, ...): the median over rounds of (sum of solo steps) /
                 (population step), so a change in the machine's load hits both sides alike

The load average is printed before and after: the machine is shared, and the ratios, measured
side by side, are what to read.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from jlora.core.step import step_inputs
from jlora.research import experiments as ex
from jlora.training.data.rows import batch_at
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run config (default: the embedded default run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as `jlora train`")
    parser.add_argument("--steps", type=int, help="steps of each run (default: the config's)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of the per-step comparison")
    return parser.parse_args(argv)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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


def timed_step(runner: ex.Runner, batch) -> tuple[ex.Runner, float]:
    start = time.perf_counter()
    state, metrics = runner.step(runner.state, batch, runner.rng)
    jax.block_until_ready(metrics)
    return runner._replace(state=state), time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = [*args.set, *([f"steps={args.steps}"] if args.steps else [])]
    cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
    task = ex.load_task(cfg)
    members = members_of(cfg)
    print(
        f"load average {load()} | {cfg.model.name} {cfg.model.random} | {cfg.steps} steps of {cfg.batch_size} x "
        f"{cfg.seq_len} tokens | {len(members)} members: {', '.join(m.name for m in members)}"
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
        f"end to end: population {population_e2e:.1f} s, 8 solo runs {sum(solo_e2e):.1f} s "
        f"({', '.join(f'{t:.1f}' for t in solo_e2e)}): {e2e:.2f}x | load {load()}"
    )

    batch = batch_at(task.train, 0, cfg.batch_size, cfg.seed)
    population, _ = ex.population_runner(task, members, cfg)
    solos = [solo_runner(task, m) for m in members]
    pop_compile = compile_seconds(population, batch)
    solo_compile = [compile_seconds(runner, batch) for runner in solos]
    print(f"compile: population {pop_compile:.1f} s, 8 solo steps {sum(solo_compile):.1f} s | load {load()}")

    population, _ = timed_step(population, batch)  # the jit's own compilation, untimed
    solos = [timed_step(runner, batch)[0] for runner in solos]
    pop_times, solo_times = [], []
    for i in range(args.rounds):
        batch = batch_at(task.train, i + 1, cfg.batch_size, cfg.seed)
        population, t_pop = timed_step(population, batch)
        total = 0.0
        for j, runner in enumerate(solos):
            solos[j], t = timed_step(runner, batch)
            total += t
        pop_times.append(t_pop)
        solo_times.append(total)
    per_step = float(np.median(np.asarray(solo_times) / np.asarray(pop_times)))
    print(
        f"per step: population {np.median(pop_times) * 1e3:.1f} ms, 8 solo steps {np.median(solo_times) * 1e3:.1f} ms: "
        f"{per_step:.2f}x (median of {args.rounds} rounds) | load {load()}"
    )
    return {
        "end_to_end": {"population_s": population_e2e, "solo_s": solo_e2e, "ratio": e2e},
        "compile": {"population_s": pop_compile, "solo_s": solo_compile},
        "per_step": {
            "population_ms": float(np.median(pop_times)) * 1e3,
            "solo_ms": float(np.median(solo_times)) * 1e3,
            "ratio": per_step,
        },
    }


if __name__ == "__main__":
    main()
