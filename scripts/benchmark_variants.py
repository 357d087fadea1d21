"""DoRA's train step against plain LoRA's, in jlora and in Hugging Face PEFT, on the same shapes in one run.

    python scripts/benchmark_variants.py                        # GPT-2 small shape, r=8 on c_attn, 8 x 128 tokens
    python scripts/benchmark_variants.py --quick                # a 1-layer, 32-wide model, one round (the tests)
    python scripts/benchmark_variants.py --lora-dropout 0.1     # DoRA's dropout form (a second base matmul)
    python scripts/benchmark_variants.py --targets c_attn,c_proj,c_fc   # every projection adapted

Four persistent worker processes hold one model each (jlora LoRA, jlora DoRA, PEFT LoRA, PEFT
DoRA: random GPT-2 weights, r, alpha = 2r on --targets (c_attn), AdamW at 2e-4, GPT-2's dropout in training
mode, one fixed batch). After each has compiled and run a warm-up step, they step strictly in
turn, one at a time, for --rounds rounds (`scripts/harness.py`); each round gives the ratios DoRA /
LoRA of jlora and of PEFT, and the medians of those per-round ratios are reported (a machine's
speed drifts between rounds, not within one), with the load beside every round and the verdict
on it.
"""

from __future__ import annotations

import argparse
import sys

from harness import (
    Worker,
    add_model_arguments,
    alternate,
    cpu_name,
    load_average,
    median_seconds,
    ratio,
    serve,
    timed,
    verdict,
)

WORKERS = (("jlora", "lora"), ("jlora", "dora"), ("peft", "lora"), ("peft", "dora"))
QUICK = dict(n_layer=1, n_embd=32, n_head=2, vocab=300, batch=2, seq=16, rounds=1)


def batch_ids(args):
    import numpy as np

    return np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)


def jlora_step(args, dora: bool):
    """A compiled jlora train step on its own state: ``() -> None`` (blocks until done), and XLA's FLOP count."""
    import jax
    import numpy as np

    import jlora

    config = jlora.GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(1024, args.seq),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    targets = tuple(args.targets.split(","))
    cfg = jlora.LoraConfig(r=args.r, alpha=2 * args.r, dropout=args.lora_dropout, target_modules=targets, use_dora=dora)
    model = jlora.GPT2(config, cfg)
    params = jlora.init_params(jax.random.key(0), config)
    variables = {"params": params, "lora": jlora.init_lora(jax.random.key(1), cfg, params)}
    ocfg = jlora.OptimConfig(lr=2e-4, clip_norm=None, total_steps=1000)
    start, step = jlora.init_training(model, variables, ocfg, n_devices=1)
    state = [start]
    ids = batch_ids(args)
    batch = jax.device_put({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones(ids[:, 1:].shape)})
    s = state[0]
    cost = step.compiled.lower(s.step, s.trainable, s.opt_state, s.frozen, batch, jax.random.key(2)).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost

    def one() -> None:
        state[0], metrics = step(state[0], batch, jax.random.key(2))
        jax.block_until_ready(metrics["loss"])

    return one, float((cost or {}).get("flops", 0.0))


def peft_step(args, dora: bool):
    """One PEFT + PyTorch train step on its own model: ``() -> None``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(1024, args.seq),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    lora = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=args.lora_dropout,
        target_modules=args.targets.split(","),
        fan_in_fan_out=True,
        use_dora=dora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(GPT2LMHeadModel(config), lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.tensor(batch_ids(args)[:, :-1]).long()  # HF shifts the labels itself

    def one() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one, 0.0


class Step:
    """One system's train step in a worker: ``step(i) -> seconds`` (every round on the same batch)."""

    def __init__(self, args):
        system, variant = args.worker.split(":")
        self.one, self.flops = (jlora_step if system == "jlora" else peft_step)(args, variant == "dora")
        self.one()  # compiles (jlora) / allocates (both)

    def step(self, i: int) -> float:
        return timed(self.one)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    add_model_arguments(parser)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path (both systems)")
    parser.add_argument("--targets", default="c_attn", help="adapted modules, comma-separated (default c_attn)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; each steps every worker once, in turn")
    parser.add_argument("--no-peft", action="store_true", help="jlora's two workers only")
    parser.add_argument("--quick", action="store_true", help="a 1-layer, 32-wide model, one round (a check)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.worker:
        return serve(lambda: Step(args), info=lambda s: {"flops": s.flops})

    names = [f"{s}:{v}" for s, v in WORKERS if not (args.no_peft and s == "peft")]
    shape = f"GPT-2 L={args.n_layer} D={args.n_embd} H={args.n_head} V={args.vocab}"
    print(f"{shape} | r={args.r} on {args.targets}, LoRA dropout {args.lora_dropout} | batch {args.batch} x {args.seq}")
    print(f"{cpu_name()} | load {load_average():.2f}", flush=True)
    argv = list(argv if argv is not None else sys.argv[1:])
    workers = {}
    for name in names:  # one at a time, so no two compile together
        workers[name] = Worker(__file__, name, argv)
        if workers[name].info["flops"]:
            print(f"{name}: XLA counts {workers[name].info['flops'] / 1e9:.1f} GFLOP per step", flush=True)
    rounds = alternate(workers, range(args.rounds))
    for worker in workers.values():
        worker.finish()
    for system in dict.fromkeys(s for s, _ in WORKERS):
        if f"{system}:dora" not in names:
            continue
        lora, dora = median_seconds(rounds, f"{system}:lora"), median_seconds(rounds, f"{system}:dora")
        print(
            f"{system:5s}: LoRA step {lora:.2f} s, DoRA step {dora:.2f} s (medians); "
            f"DoRA / LoRA {ratio(rounds, f'{system}:dora', f'{system}:lora'):.2f}x (median of per-round ratios)"
        )
    if "peft:lora" in names:
        lora, dora = ratio(rounds, "peft:lora", "jlora:lora"), ratio(rounds, "peft:dora", "jlora:dora")
        print(f"PEFT / jlora step time: LoRA {lora:.2f}x, DoRA {dora:.2f}x (medians of per-round ratios)")
    print(verdict(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
