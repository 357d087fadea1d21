"""Train-step speed: jlora's compiled step against Hugging Face PEFT + PyTorch on the same shapes.

    python scripts/benchmark.py                      # GPT-2 small shape, LoRA r=8 on c_attn, 8 x 128 tokens
    python scripts/benchmark.py --steps 3 --no-peft  # jlora only
    python scripts/benchmark.py --n-layer 2 --vocab 1000 --steps 2   # a quick smoke run

Both sides: randomly initialised GPT-2 weights, LoRA r=8, alpha=16 on c_attn, AdamW at 2e-4,
dropout as the model config has it (training mode), one update per step on a fixed batch. PEFT
runs in a subprocess of this script (``--peft-worker``), after jlora, so the two never share
the cores.

FLOPs of one step, counted by hand (N = batch * seq tokens, L layers, D width, V vocab, r rank,
matmuls only; a multiply-add is 2 FLOPs)::

    forward  = 2 N (12 L D^2 + D V)          the four projections per block and the tied LM head
             + 4 batch L seq^2 D              attention scores and weighted values (full square, causal-masked)
             + 2 N L r (D + 3D)               the LoRA path A then B on c_attn (D -> 3D)
    backward = forward                        gradients w.r.t. activations only: the frozen weights
                                              get none, so each matmul has one backward matmul, not two
             + 2 N L r (D + 3D)               the LoRA weight gradients dA, dB
    step     = forward + backward  (~ 2 x forward)

XLA's own count of the compiled step (its cost analysis) is printed beside it as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def step_flops(batch: int, seq: int, n_layer: int, d: int, vocab: int, r: int) -> float:
    """Hand count of one LoRA train step's FLOPs (see the module docstring)."""
    n = batch * seq
    lora = 2 * n * n_layer * r * (d + 3 * d)
    forward = 2 * n * (12 * n_layer * d * d + d * vocab) + 4 * batch * n_layer * seq * seq * d + lora
    return 2 * forward + lora


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def run_jlora(args) -> dict:
    import jax
    import numpy as np

    import jlora

    config = jlora.GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(1024, args.seq),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        dtype=args.dtype,
        remat=args.remat,
    )
    model = jlora.GPT2(config, jlora.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=("c_attn",)))
    params = jlora.init_params(jax.random.key(0), config)
    variables = {"params": params, "lora": jlora.init_lora(jax.random.key(1), model, params)}
    mask = jlora.trainable_mask(variables)
    cfg = jlora.OptimConfig(lr=2e-4, clip_norm=None, total_steps=1000)
    optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
    state = jlora.init_state(variables, mask, optimizer)
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=1)
    ids, targets = make_batch(args.batch, args.seq, args.vocab)
    batch = {"input_ids": ids, "targets": targets, "loss_mask": np.ones(ids.shape, np.float32)}
    batch = jax.device_put(batch)
    rng = jax.random.key(2)

    start = time.perf_counter()
    inputs = (state.step, state.trainable, state.opt_state, state.frozen, batch, rng)
    compiled = step.compiled.lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def one(state):
        (n, trainable, opt_state), metrics = compiled(
            state.step, state.trainable, state.opt_state, state.frozen, batch, rng
        )
        jax.block_until_ready(metrics["loss"])
        return jlora.TrainState(n, trainable, state.frozen, opt_state), metrics

    state, metrics = one(state)  # warm-up: first run allocates
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = one(state)
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "step_s": times, "loss": float(metrics["loss"]), "xla_flops": xla_flops}


def matmul_gflops(args, repeats: int = 5) -> float:
    """XLA's float32 matmul speed right now, on the MLP's (N, D) @ (D, 4D): the roofline to compare
    the step with, measured in the same run because a shared machine's speed varies."""
    import jax

    n, d = args.batch * args.seq, args.n_embd
    a, b = jax.random.normal(jax.random.key(0), (n, d)), jax.random.normal(jax.random.key(1), (d, 4 * d))
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n * d * 4 * d / min(times) / 1e9


def run_peft(args) -> dict:
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
        r=args.r, lora_alpha=2 * args.r, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model = get_peft_model(GPT2LMHeadModel(config), lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids, _ = make_batch(args.batch, args.seq + 1, args.vocab)  # HF shifts the labels itself
    ids = torch.tensor(ids).long()

    def one():
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    one()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = one()
        times.append(time.perf_counter() - t)
    return {"step_s": times, "loss": loss, "threads": torch.get_num_threads()}


def report(name: str, result: dict, tokens: int, flops: float) -> float:
    step_s = min(result["step_s"])
    mean_s = sum(result["step_s"]) / len(result["step_s"])
    line = (
        f"{name:6s} step {step_s:6.2f} s (mean {mean_s:.2f} s over {len(result['step_s'])}) | "
        f"{tokens / step_s:7.1f} tokens/s | {flops / step_s / 1e9:6.1f} GFLOP/s | loss {result['loss']:.3f}"
    )
    if "compile_s" in result:
        line += f" | compile {result['compile_s']:.1f} s"
    print(line, flush=True)
    return tokens / step_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="jlora's compute dtype")
    parser.add_argument("--remat", action="store_true", help="jlora: recompute each block in the backward pass")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--no-peft", action="store_true", help="skip the Hugging Face PEFT comparison")
    parser.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.peft_worker:
        print(json.dumps(run_peft(args)))
        return 0

    tokens = args.batch * args.seq
    flops = step_flops(args.batch, args.seq, args.n_layer, args.n_embd, args.vocab, args.r)
    shape = f"GPT-2 L={args.n_layer} D={args.n_embd} H={args.n_head} V={args.vocab}"
    print(f"{shape} | LoRA r={args.r} on c_attn | batch {args.batch} x {args.seq} | {os.cpu_count()} CPUs")
    print(f"FLOPs per step: {flops / 1e9:.1f} G by hand", end="", flush=True)
    result = run_jlora(args)
    print(f", {result['xla_flops'] / 1e9:.1f} G by XLA's cost analysis")
    ours = report(f"jlora ({args.dtype})" if args.dtype != "float32" else "jlora", result, tokens, flops)
    peak = matmul_gflops(args)
    achieved = flops / min(result["step_s"]) / 1e9
    print(f"XLA float32 matmul now: {peak:.1f} GFLOP/s; the jlora step runs at {achieved / peak:.0%} of it")

    if args.no_peft:
        return 0
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("PEFT: torch or peft not installed; skipped")
        return 0
    worker = [sys.executable, __file__, "--peft-worker", *(argv if argv is not None else sys.argv[1:])]
    proc = subprocess.run(worker, capture_output=True, text=True)
    if proc.returncode:
        print(f"PEFT run failed:\n{proc.stderr[-2000:]}")
        return 1
    peft_result = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = report("PEFT", peft_result, tokens, flops)
    print(f"jlora / PEFT tokens/s: {ours / theirs:.2f}x (torch threads {peft_result['threads']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
