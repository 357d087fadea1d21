"""K adapters answering P prompts as one mixed batch, against K separate `generate` calls, one per adapter.

    python scripts/benchmark_mixed.py --out runs/bench_mixed      # K = 8, 64 prompts, 32 new tokens each
    python scripts/benchmark_mixed.py --quick --in-process         # 1 layer, 32 wide, K = 2, 8 prompts: seconds
    python scripts/benchmark_mixed.py --n-layer 12 --n-embd 768 --n-head 12 --vocab 50257 --positions 1024  # gpt2

Prompt n is answered by adapter n mod K, so both systems write the same P answers::

    mixed     one call   generate(model, params, P prompts, adapters=stack, adapter_index=[n mod K])
    separate  K calls    generate(model, params, adapter k's P / K prompts, lora=adapter k): each merges
                         its adapter into the weights (the single-adapter path) and decodes
    base      one call   generate(model, params, P prompts): the base model alone, no adapter; the
                         floor of any one batch of P rows, so separate / base bounds what the mixed
                         batch can gain on this machine

The model is the embedded default run's shape (4 layers, 128 wide, 64 positions, byte vocabulary)
with random weights, the K adapters r=8, alpha=16 on c_attn, c_proj and c_fc with random A and B;
decoding is greedy with no end-of-text, so every row makes --new-tokens tokens on both sides. Each
system lives in its own worker process (`scripts/harness.py`); a worker compiles and runs a first,
untimed round when it starts (its compile seconds and that round's wall time are reported), then
the two step strictly in turn, each round on new prompts of the same length (whether the first
round's answers agree token for token is checked and printed; the base's differ, it has no adapter).
Reported: tokens/s of each (median round), the median per-round ratios separate / mixed (the aim:
>= 3x) and separate / base (the most any one batch can gain here), the load beside every round and
the verdict (only figures taken idle are results), and --out/summary.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Worker, add_model_arguments, alternate, median_seconds, ratio, serve, summary, timed, verdict  # noqa: E402

SYSTEMS = ("mixed", "separate", "base")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=8, help="K, the adapters (default 8)")
    parser.add_argument("--prompts", type=int, default=64, help="P, the prompts of a round (default 64)")
    parser.add_argument("--prompt-length", type=int, default=16, help="tokens of each prompt (default 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each answer makes (default 32)")
    add_model_arguments(parser, n_layer=4, n_embd=128, n_head=4, vocab=257)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--targets", default="c_attn,c_proj,c_fc", help="adapted modules, comma-separated")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds, each stepping both systems in turn")
    parser.add_argument("--quick", action="store_true", help="1 layer, 32 wide, K = 2, 8 prompts, 4 tokens, 2 rounds")
    parser.add_argument("--in-process", action="store_true", help="both systems in this process (a smoke check)")
    parser.add_argument("--out", help="folder for summary.json")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        small = dict(adapters=2, prompts=8, prompt_length=6, new_tokens=4, n_layer=1, n_embd=32, n_head=2, rounds=2)
        for name, value in small.items():
            setattr(args, name, value)
    if args.prompts % args.adapters:
        parser.error(f"--prompts {args.prompts} must be a multiple of --adapters {args.adapters}")
    return args


class Answering:
    """One system: the model, K adapters, and ``step(i)``: round i's P prompts answered its way."""

    def __init__(self, args: argparse.Namespace, how: str):
        import jax

        import jlora
        from jlora.core.algebra.mixed import stack_adapters

        self.args, self.how = args, how
        config = jlora.GPT2Config(
            vocab_size=args.vocab, n_positions=args.positions, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head,
        )  # fmt: skip
        self.params = jlora.init_params(jax.random.key(0), config)
        self.cfg = jlora.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=tuple(args.targets.split(",")))
        self.model = jlora.GPT2(config, self.cfg)
        self.loras = []
        for k in range(args.adapters):
            lora = jlora.init_lora(jax.random.key(k), self.cfg, self.params)
            leaves, treedef = jax.tree.flatten(lora)
            keys = jax.random.split(jax.random.key(1000 + k), len(leaves))
            self.loras.append(treedef.unflatten([0.1 * jax.random.normal(q, x.shape) for q, x in zip(keys, leaves)]))
        self.stack = stack_adapters(self.loras) if how == "mixed" else None
        start = time.perf_counter()
        first = self.answer(self.prompts(0))
        self.first_round_s = time.perf_counter() - start
        self.compile_s = sum(out.compile_seconds for out in first)
        self.answers = hashlib.sha256(self.in_prompt_order(first).tobytes()).hexdigest()

    def prompts(self, i: int) -> np.ndarray:
        """Round i's (P, prompt length) token ids."""
        rng = np.random.default_rng(i)
        return rng.integers(0, self.args.vocab, (self.args.prompts, self.args.prompt_length))

    def answer(self, prompts: np.ndarray) -> list:
        from jlora.core.decoding.generate import generate

        k, options = self.args.adapters, dict(max_new_tokens=self.args.new_tokens)
        rows = prompts.tolist()
        if self.how == "mixed":
            index = [n % k for n in range(len(rows))]
            return [generate(self.model, self.params, rows, adapters=self.stack, adapter_index=index, **options)]
        if self.how == "base":
            return [generate(self.model, self.params, rows, **options)]
        return [
            generate(self.model, self.params, rows[j::k], lora=lora, **options) for j, lora in enumerate(self.loras)
        ]

    def in_prompt_order(self, outs: list) -> np.ndarray:
        """(P, new tokens): the answers of `answer` row by row in prompt order, whichever way they were made."""
        if self.how != "separate":
            return outs[0].tokens
        tokens = np.zeros((self.args.prompts, self.args.new_tokens), np.int32)
        for j, out in enumerate(outs):
            tokens[j :: self.args.adapters] = out.tokens
        return tokens

    def step(self, i: int) -> float:
        prompts = self.prompts(i)
        return timed(lambda: self.answer(prompts))

    def info(self) -> dict:
        import jax

        return {
            "compile_s": self.compile_s,
            "first_round_s": self.first_round_s,
            "answers_sha256": self.answers,
            "device": jax.devices()[0].device_kind,
        }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        sys.exit(serve(lambda: Answering(args, args.worker), Answering.info))
    argv = list(sys.argv[1:] if argv is None else argv)
    tokens = args.prompts * args.new_tokens
    shape = f"GPT-2 L={args.n_layer} D={args.n_embd} H={args.n_head} V={args.vocab}"
    print(
        f"{shape} | K={args.adapters} adapters r={args.r} on {args.targets} | {args.prompts} prompts of "
        f"{args.prompt_length} tokens, {args.new_tokens} new tokens each ({tokens} a round)",
        flush=True,
    )
    if args.in_process:
        systems = {name: Answering(args, name) for name in SYSTEMS}
        infos = {name: system.info() for name, system in systems.items()}
    else:  # started one after the other, so the two never compile together
        systems = {name: Worker(__file__, name, argv) for name in SYSTEMS}
        infos = {name: {k: v for k, v in worker.info.items() if k != "ready"} for name, worker in systems.items()}
    for name, info in infos.items():
        print(f"{name}: compiling {info['compile_s']:.2f} s, first round {info['first_round_s']:.2f} s", flush=True)
    same = infos["mixed"]["answers_sha256"] == infos["separate"]["answers_sha256"]
    print(f"the first round's answers are {'the same' if same else 'NOT the same'} mixed and separate", flush=True)
    rounds = alternate(systems, range(1, args.rounds + 1))
    if not args.in_process:
        for worker in systems.values():
            worker.finish()
    figures = {
        name: {
            **infos[name],
            "round_s": median_seconds(rounds, name),
            "tokens_per_s": tokens / median_seconds(rounds, name),
        }
        for name in SYSTEMS
    }
    speedup, ceiling = ratio(rounds, "separate", "mixed"), ratio(rounds, "separate", "base")
    for name, f in figures.items():
        print(f"{name}: {f['tokens_per_s']:.1f} tokens/s ({f['round_s']:.3f} s a round, median)")
    print(f"mixed batch / separate calls: {speedup:.2f}x (median of per-round ratios; aim >= 3x)")
    print(f"the base alone in one batch / separate calls: {ceiling:.2f}x (the most one batch can gain here)")
    print(verdict(rounds))
    result = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "systems": figures,
        "speedup": speedup,
        "ceiling": ceiling,
        "same_answers": same,
        "rounds": [{"index": r.index, "seconds": r.seconds, "load": r.load} for r in rounds],
        "load": summary(rounds),
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
