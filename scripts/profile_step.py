"""Where a CPU train step's time goes, and how close it runs to XLA's matrix-product rate on its own shapes.

    python scripts/profile_step.py                  # GPT-2 small shapes, 8 x 128 tokens, r=8 on c_attn
    python scripts/profile_step.py --quick          # a 1-layer, 64-wide model: seconds (the tests run it)
    python scripts/profile_step.py --variant "no dropout:model.random.resid_pdrop=0" ...

The systems, in one process, stepped strictly in turn (`scripts/harness.py`), every round on the
same batch (the benchmark's uniform workload: random tokens, loss at every position):

    step         jlora's train step as `jlora train` builds it (GPT-2's dropout, LoRA dropout 0.05)
    no dropout   the same step with every dropout rate 0: what drawing the masks costs
    gemms        the step's matrix products alone: each (m, k, n) shape of its forward and backward
                 passes (the frozen weights get no weight gradient) timed on its own, as many times
                 as the step has it, and summed: the step's matrix-product ceiling in XLA on this CPU

Reported: each system's median time, the step's useful GFLOP/s (the hand count of
`scripts/benchmark.py`), the matrix products' own rate (their FLOPs over their time), and the
step's share of that rate: the part of the step that is matrix products at XLA's speed. XLA's
cost analysis of the compiled step (FLOPs, transcendentals, bytes accessed) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from harness import add_model_arguments, alternate, cpu_name, load_average, median_seconds, summary

QUICK = dict(n_layer=1, n_embd=64, n_head=2, vocab=300, batch=4, seq=32, rounds=2)


def gemm_shapes(args) -> dict[tuple[int, int, int, int], int]:
    """{(batch, m, k, n): count} of the train step's matrix products, forward and backward.

    N = batch * seq tokens, D width, V vocabulary, r rank, H heads of Dh = D / H, T = seq.
    Forward per layer: c_attn (N, D) x (D, 3D); scores and weighted values (B H, T, Dh) x (Dh, T) and
    (B H, T, T) x (T, Dh); c_proj (N, D) x (D, D); c_fc (N, D) x (D, 4D); mlp.c_proj (N, 4D) x (4D, D);
    LoRA (N, D) x (D, r), (N, r) x (r, 3D). The head (N, D) x (D, V). Backward: each product's input
    gradient (the same FLOPs), both inputs' gradients for the two attention products and for LoRA,
    and the LoRA weight gradients; no weight gradient for the frozen projections or the head.
    """
    n, d, v, r = args.batch * args.seq, args.n_embd, args.vocab, args.r
    t, dh, bh = args.seq, args.n_embd // args.n_head, args.batch * args.n_head
    layer = [
        ((1, n, d, 3 * d), 1),
        ((1, n, 3 * d, d), 1),  # c_attn and its input gradient
        ((1, n, d, d), 2),  # c_proj and its input gradient
        ((1, n, d, 4 * d), 1),
        ((1, n, 4 * d, d), 1),  # c_fc, mlp.c_proj
        ((1, n, d, 4 * d), 1),
        ((1, n, 4 * d, d), 1),  # their input gradients
        ((bh, t, dh, t), 2),
        ((bh, t, t, dh), 4),  # scores (+ one of its gradients), values (+ 3)
        ((1, n, d, r), 2),
        ((1, n, r, 3 * d), 2),
        ((1, d, n, r), 1),
        ((1, r, n, 3 * d), 1),  # LoRA
    ]
    shapes: dict = {}
    for shape, count in layer:
        shapes[shape] = shapes.get(shape, 0) + count * args.n_layer
    for shape in ((1, n, d, v), (1, n, v, d)):  # the head and its input gradient
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


class Gemms:
    """The step's matrix products, each shape compiled alone: ``step(i) -> seconds`` of all of them."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        self.jax, self.shapes, self.calls = jax, gemm_shapes(args), []
        for (b, m, k, n), count in self.shapes.items():
            x = jax.random.normal(jax.random.key(m + k), (b, m, k), jnp.float32)
            w = jax.random.normal(jax.random.key(n), (b, k, n), jnp.float32)
            dot = jax.jit(lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w))
            jax.block_until_ready(dot(x, w))  # compiled before it is timed
            self.calls.append((dot, x, w, count))
        self.flops = sum(2 * b * m * k * n * c for (b, m, k, n), c in self.shapes.items())

    def step(self, i: int) -> float:
        total = 0.0
        for dot, x, w, count in self.calls:
            for _ in range(count):
                start = time.perf_counter()
                self.jax.block_until_ready(dot(x, w))
                total += time.perf_counter() - start
        return total


class Step:
    """jlora's compiled train step on a uniform batch; `overrides` change the run config (e.g. dropout)."""

    def __init__(self, args, overrides: list[str] = ()):
        import jax
        import numpy as np

        import jlora
        from jlora.training.run.config import load_run_config

        cfg = load_run_config(None, [f"lora.r={args.r}", f"lora.alpha={2 * args.r}", "lora.dropout=0.05", *overrides])
        m = cfg.model.random
        config = jlora.GPT2Config(
            vocab_size=args.vocab,
            n_positions=max(1024, args.seq),
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            embd_pdrop=m.get("embd_pdrop", 0.1),
            resid_pdrop=m.get("resid_pdrop", 0.1),
        )
        model = jlora.GPT2(config, cfg.lora)
        params = jlora.random_params(0, config)
        variables = {"params": params, "lora": jlora.init_lora(jax.random.key(1), model, params)}
        self.state, self.step_fn = jlora.init_training(model, variables, cfg.optim, n_devices=1)
        ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
        ones = np.ones((args.batch, args.seq), np.float32)
        self.batch = jax.device_put({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": ones})
        self.rng, self.jax = jax.random.key(2), jax
        s = self.state
        lowered = self.step_fn.compiled.lower(s.step, s.trainable, s.opt_state, s.frozen, self.batch, self.rng)
        self.compiled = lowered.compile()
        cost = self.compiled.cost_analysis()
        self.cost = (cost[0] if isinstance(cost, list) else cost) or {}

    def step(self, i: int) -> float:
        s = self.state
        start = time.perf_counter()
        (n, trainable, opt_state), metrics = self.compiled(
            s.step, s.trainable, s.opt_state, s.frozen, self.batch, self.rng
        )
        self.jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - start
        self.state = s.replace(step=n, trainable=trainable, opt_state=opt_state)
        return seconds


def useful_flops(args) -> float:
    """The benchmark's hand count of a uniform step (scripts/benchmark.py's docstring)."""
    n, L, D, V, r = args.batch * args.seq, args.n_layer, args.n_embd, args.vocab, args.r
    lora = 2 * n * L * r * (D + 3 * D)
    forward = 2 * n * 12 * L * D * D + 4 * L * D * args.batch * args.seq**2 + lora + 2 * n * D * V
    return 2 * forward + lora


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... another step to time")
    parser.add_argument("--quick", action="store_true", help="a 1-layer, 64-wide model (a check)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    variants = {"no dropout": ["model.random={embd_pdrop: 0.0, resid_pdrop: 0.0}", "lora.dropout=0.0"]}
    for spec in args.variant:
        name, sep, sets = spec.partition(":")
        if not sep or not name or not sets:
            parser.error(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}")
        variants[name] = sets.split(",")
    print(
        f"GPT-2 L={args.n_layer} D={args.n_embd} H={args.n_head} V={args.vocab} | LoRA r={args.r} on c_attn | "
        f"batch {args.batch} x {args.seq} | {cpu_name()} | load {load_average():.2f}",
        flush=True,
    )
    systems = {"step": Step(args), **{name: Step(args, sets) for name, sets in variants.items()}, "gemms": Gemms(args)}
    cost = systems["step"].cost
    print(
        f"XLA's cost analysis of the step: {cost.get('flops', 0) / 1e9:.1f} GFLOP, "
        f"{cost.get('transcendentals', 0) / 1e6:.1f} M transcendentals, {cost.get('bytes accessed', 0) / 1e9:.2f} GB "
        f"accessed | the hand count: {useful_flops(args) / 1e9:.1f} useful GFLOP, matrix products "
        f"{systems['gemms'].flops / 1e9:.1f} GFLOP",
        flush=True,
    )
    rounds = alternate(systems, range(1, args.rounds + 1), warmup=[0])
    gemm_rate = systems["gemms"].flops / median_seconds(rounds, "gemms")
    useful = useful_flops(args)
    result = {"cpu": cpu_name(), "load": summary(rounds), "gemm_gflops": gemm_rate / 1e9, "systems": {}}
    for name in systems:
        seconds = median_seconds(rounds, name)
        figures = {"step_s": seconds, "rounds_s": [r.seconds[name] for r in rounds]}
        if name != "gemms":
            rate = useful / seconds
            figures.update(useful_gflops=rate / 1e9, share_of_gemm_rate=rate / gemm_rate)
            figures["vs_step"] = statistics.median(r.seconds[name] / r.seconds["step"] for r in rounds)
        result["systems"][name] = figures
        line = f"{name:14s} {seconds * 1e3:9.1f} ms"
        if name != "gemms":
            line += (
                f" | {figures['useful_gflops']:6.1f} useful GFLOP/s, {figures['share_of_gemm_rate']:.0%} of the "
                f"matrix-product rate | {figures['vs_step']:.3f} x the step's time"
            )
        else:
            line += f" | {gemm_rate / 1e9:6.1f} GFLOP/s: XLA's matrix products on the step's own shapes"
        print(line)
    print(result["load"]["verdict"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
