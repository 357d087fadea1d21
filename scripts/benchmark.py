"""Train-step speed and memory: jlora against Hugging Face PEFT + PyTorch, on the work users run.

    python scripts/benchmark.py                         # both workloads, GPT-2 small shapes (5 min on 2 idle cores)
    python scripts/benchmark.py --workload qa --rounds 12
    python scripts/benchmark.py --quick                 # a 1-layer, 32-wide model, one round (the tests run it)
    python scripts/benchmark.py --model smollm2         # a real model: SmolLM2-135M (a folder or GGUF file too)

Two workloads, LoRA r=8, alpha=16 on c_attn, AdamW, dropout on (training mode), random weights:

    qa       the reference setup (configs/gpt2_qa.yaml): the bundled QA rows, batch 8, seq_len 512,
             loss on the answer and closing end-of-text only. The step's batch is the run's
             (`batch_at(data, step)`). jlora shapes it as `jlora train` does (the config's
             data.buckets / data.pack); PEFT gets it as a PEFT user's collator gives it: each batch
             padded to its longest row, labels -100 on the prompt and the padding.
    uniform  8 x 128 random tokens, loss at every position: no padding for either side to skip.

The rows are tokenized with jlora's byte tokenizer (the real GPT-2 vocabulary is not available
offline; byte rows are about 2.5 times longer than GPT-2 BPE rows, 38-58 tokens here). With
``--model`` (a Hugging Face folder, a GGUF file, or "smollm2") both systems load that model's weights
(PEFT through transformers' own loading), the QA rows are tokenized with its tokenizer, and the
adapters go on its q, k and v projections (for a Llama-family model; c_attn for GPT-2), r=8, alpha=16.

Fair timing (`scripts/harness.py`): each system lives in its own persistent worker process (model
built, steps compiled), and they step strictly in turn, A, B, C, A, B, C, each step of round i on
the same batch; a ratio is the median over rounds of the per-round ratio. The load average is
read after every round, and the summary says whether the comparison is a result (every round's
1-minute load below the number of cores plus 0.5) or by how much it was not. Useful tokens are a
batch's real tokens (its rows' lengths, no padding), the same count for every system.

The systems: ``jlora`` (the config's batch layout), PEFT in float32 (``peft``) and PEFT under
``torch.autocast(bfloat16)`` (``peft-bf16``: what a PEFT user with a recent Xeon or a GPU may pick;
reported, not a target), chosen with ``--peft``; ``--variant NAME:KEY=VALUE,...`` adds jlora workers
with other config values (``--variant b16:data.buckets=16 --variant packed:data.pack=true`` measures
the batch layouts against each other in the same rounds). ``--against NAME=PATH`` adds jlora as another
checkout has it (``git worktree add /tmp/old <commit>``; its own benchmark worker, on its own code),
stepped in the same rounds: how a change moved the step's speed.

Useful FLOPs of a step, counted by hand (n useful tokens, m loss positions, rows of length l_i,
L layers, D width, V vocabulary, r rank; a multiply-add is 2 FLOPs)::

    forward  = 2 n 12 L D^2                 the four projections of each block
             + 4 L D sum_i l_i^2            attention scores and weighted values (full square)
             + 2 n L r (D + 3D)             the LoRA path A then B on c_attn (D -> 3D)
             + 2 m D V                      the tied LM head, where the loss is
    step     = 2 forward + 2 n L r (D + 3D) the backward is the forward again (the frozen weights get
                                            no weight gradient) plus the LoRA weight gradients

On an accelerator the useful FLOP rate is also printed as model FLOP utilisation against the
device's dense bf16 peak (a table below; unknown devices get no MFU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness import (
    Worker,
    add_model_arguments,
    alternate,
    cpu_name,
    load_average,
    median_seconds,
    ratio,
    serve,
    summary,
)

QA_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt2_qa.yaml"

BF16_PEAK_TFLOPS = {  # dense, per chip
    "H200": 989,
    "H100": 989,
    "A100": 312,
    "L4": 121,
    "A10G": 70,
    "TPU v4": 275,
    "TPU v5 lite": 197,
    "TPU v5e": 197,
    "TPU v5p": 459,
    "TPU v6 lite": 918,
}


QUICK = dict(n_layer=1, n_embd=32, n_head=2, vocab=300, batch=4, seq_len=64, uniform_seq=16, rounds=1)


# --- the work: batches of each workload, the same in both workers ---------------------------------------------


def workload_batches(args) -> list[dict]:
    """Host batches of steps 0 .. rounds (step 0 warms up): (B, T) right-padded rows in jlora's layout."""
    import numpy as np

    if args.workload == "uniform":
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(args.rounds + 1):
            ids = rng.integers(0, args.vocab, (args.batch, args.uniform_seq + 1)).astype(np.int32)
            ones = np.ones((args.batch, args.uniform_seq), np.int32)
            batches.append(
                {
                    "input_ids": ids[:, :-1],
                    "targets": ids[:, 1:],
                    "loss_mask": ones.astype(np.float32),
                    "attention_mask": ones,
                }
            )
        return batches
    from jlora.training.data.rows import batch_at, tokenize
    from jlora.training.data.sources import read_examples
    from jlora.training.data.tokenizer import ByteTokenizer, load_tokenizer

    tokenizer = load_tokenizer(args.model) if args.model else ByteTokenizer()
    data = tokenize(read_examples("bundled"), tokenizer, args.seq_len)
    return [batch_at(data, step, args.batch, seed=0) for step in range(args.rounds + 1)]


def useful_flops(batch: dict, args) -> float:
    """Useful FLOPs of one LoRA step on `batch` (module docstring; a Llama-family model: its q, k, v, o and
    three MLP matrices per block, grouped-query k and v, LoRA on q, k and v)."""
    lengths = batch["attention_mask"].sum(axis=1).astype(float)
    n, m = lengths.sum(), float((batch["loss_mask"] > 0).sum())
    L, D, V, r = args.n_layer, args.n_embd, args.vocab, args.r
    if getattr(args, "llama", None):
        heads, kv, head_dim, F = (args.llama[k] for k in ("heads", "kv_heads", "head_dim", "intermediate"))
        q, k = heads * head_dim, kv * head_dim
        body = D * q + 2 * D * k + q * D + 3 * D * F  # multiply-adds per token and block
        lora = 2 * n * L * r * ((D + q) + 2 * (D + k))
        forward = 2 * n * L * body + 4 * L * q * (lengths**2).sum() + lora + 2 * m * D * V
        return 2 * forward + lora
    lora = 2 * n * L * r * (D + 3 * D)
    forward = 2 * n * 12 * L * D * D + 4 * L * D * (lengths**2).sum() + lora + 2 * m * D * V
    return 2 * forward + lora


def model_shape(args) -> None:
    """Fill args' shape from ``--model``'s config (n_layer, n_embd, n_head, vocab; a Llama's heads in args.llama)."""
    from jlora.exchange import gguf
    from jlora.exchange.hf_checkpoint import config_from_hf, read_json, resolve

    path = gguf.gguf_path(args.model)
    values = gguf.gguf_config(path) if path is not None else read_json(resolve(args.model) / "config.json")
    config = config_from_hf(values, args.model)
    args.n_layer, args.n_embd, args.vocab = config.n_layer, config.n_embd, config.vocab_size
    args.n_head = getattr(config, "n_head", None) or config.num_attention_heads
    if hasattr(config, "num_key_value_heads"):
        keys = ("heads", "kv_heads", "head_dim", "intermediate")
        values = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size)
        args.llama = dict(zip(keys, values))


def targets(args) -> list[str]:
    """The adapted modules: GPT-2's fused c_attn, or a Llama-family model's q, k and v projections."""
    return ["q_proj", "k_proj", "v_proj"] if getattr(args, "llama", None) else ["c_attn"]


def peft_collate(batch: dict) -> dict:
    """A PEFT user's batch: each row's tokens (end-of-text, prompt, answer, end-of-text), padded to the longest
    row with end-of-text, attention mask, and labels -100 on the prompt and padding (transformers shifts them)."""
    import numpy as np

    lengths = batch["attention_mask"].sum(axis=1)
    width = int(lengths.max()) + 1  # the closing end-of-text is an input token too
    eos = int(batch["targets"][0, lengths[0] - 1])
    ids = np.full((len(lengths), width), eos, np.int64)
    labels = np.full((len(lengths), width), -100, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = batch["input_ids"][i, :n]
        ids[i, n] = batch["targets"][i, n - 1]
        counted = batch["loss_mask"][i, :n] > 0  # target t is token t + 1
        labels[i, 1 : n + 1] = np.where(counted, batch["targets"][i, :n], -100)
        mask[i, : n + 1] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- the systems, each in its own worker ----------------------------------------------------------------------


class JloraSystem:
    """jlora's train step on the workload: the run config (``--config``, plus a variant's overrides), every
    distinct batch shape compiled ahead of time."""

    def __init__(self, args, batches, overrides: list[str] = ()):
        import jax

        import jlora
        from jlora.core.update.step import step_inputs
        from jlora.training.data.batching import Layout, shape_batch
        from jlora.training.run.config import load_run_config

        sets = [f"lora.r={args.r}", f"lora.alpha={2 * args.r}", f"lora.target_modules=[{','.join(targets(args))}]"]
        cfg = load_run_config(args.config, [*sets, *overrides])
        dtype = cfg.model.compute_dtype(jax.default_backend()) if args.dtype == "auto" else args.dtype
        if args.model:
            model, params = jlora.load_model(args.model, cfg.lora, dtype=dtype)
            config = model.config
        else:
            config = jlora.GPT2Config(
                vocab_size=args.vocab, n_positions=1024, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                dtype=dtype,
            )  # fmt: skip
            model = jlora.GPT2(config, cfg.lora)
            params = jlora.random_params(0, config)
        variables = {"params": params, "lora": jlora.init_lora(jax.random.key(1), model, params)}
        self.state, step = jlora.init_training(model, variables, cfg.optim, n_devices=1)
        layout = Layout(cfg.data.buckets, cfg.data.pack)
        self.batches = [jax.device_put(step_inputs(shape_batch(b, layout))) for b in batches]
        self.rng, self.jax, self.dtype = jax.random.key(2), jax, config.dtype
        self.executables, self.compile_s, self.computed = {}, 0.0, []
        for batch in self.batches:  # each distinct shape compiled once, ahead of time
            key = str(jax.tree.map(lambda x: x.shape, batch))
            self.computed.append(int(batch["input_ids"].size))
            if key not in self.executables:
                start = time.perf_counter()
                self.executables[key] = step.compiled.lower(*self._inputs(batch)).compile()
                self.compile_s += time.perf_counter() - start

    def _inputs(self, batch):
        s = self.state
        return s.step, s.trainable, s.opt_state, s.frozen, batch, self.rng

    def step(self, i: int) -> float:
        batch = self.batches[i]
        run = self.executables[str(self.jax.tree.map(lambda x: x.shape, batch))]
        start = time.perf_counter()
        (n, trainable, opt_state), metrics = run(*self._inputs(batch))
        self.jax.block_until_ready(metrics["loss"])
        seconds = time.perf_counter() - start
        self.state = self.state.replace(step=n, trainable=trainable, opt_state=opt_state)
        return seconds

    def info(self) -> dict:
        out = {
            "compile_s": self.compile_s,
            "shapes": len(self.executables),
            "dtype": self.dtype,
            "computed_tokens": self.computed[1:],
        }
        device = self.jax.devices()[0]
        if device.platform != "cpu":
            out["device"] = device.device_kind
            out["device_peak_bytes"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
        return out


class PeftSystem:
    """A PEFT user's step: get_peft_model on transformers' GPT-2, the collator's padded batches, AdamW with the
    Trainer's gradient clipping; `bf16`: under ``torch.autocast(bfloat16)``, as ``bf16=True`` gives."""

    def __init__(self, args, batches, bf16: bool = False):
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel

        from jlora.training.run.config import load_run_config

        cfg = load_run_config(args.config)
        torch.manual_seed(0)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        transformers.logging.set_verbosity_error()  # its notices about this random model's config
        if args.model:
            base = pretrained(args.model)
        else:
            eos = args.vocab - 1
            config = GPT2Config(
                vocab_size=args.vocab, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                bos_token_id=eos, eos_token_id=eos,
            )  # fmt: skip
            base = GPT2LMHeadModel(config)
        lora = LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets(args),
            fan_in_fan_out=not getattr(args, "llama", None),  # GPT-2's Conv1D stores (in, out)
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora).to(self.device).train()
        self.autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16)
        self.dtype = "bfloat16 autocast" if bf16 else "float32"
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.clip, self.trainable, self.torch = cfg.optim.clip_norm, trainable, torch
        self.batches = [{k: torch.tensor(v).to(self.device) for k, v in peft_collate(b).items()} for b in batches]

    def step(self, i: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        with self.autocast:
            loss = self.model(**self.batches[i]).loss
        loss.backward()
        if self.clip:  # the Trainer's max_grad_norm
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.detach().item()  # waits for the step
        return time.perf_counter() - start

    def info(self) -> dict:
        out = {"threads": self.torch.get_num_threads(), "dtype": self.dtype}
        if self.device == "cuda":
            out["device"] = self.torch.cuda.get_device_name()
            out["device_peak_bytes"] = self.torch.cuda.max_memory_allocated()
        return out


def pretrained(name: str):
    """transformers' own float32 model of `name`: a folder or Hub id, or a GGUF file ("smollm2": the wheel's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jlora.exchange import gguf

    path = gguf.gguf_path(name)
    if path is None:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> {"jlora[NAME]": [overrides]}; the plain config is "jlora"."""
    out = {"jlora": []}
    for spec in specs:
        name, sep, sets = spec.partition(":")
        if not sep or not name or not sets:
            raise ValueError(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}")
        out[f"jlora[{name}]"] = sets.split(",")
    return out


def parse_against(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` -> {"jlora@NAME": the checkout at PATH} (one that holds scripts/benchmark.py)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        checkout = Path(path).expanduser().resolve()
        if not sep or not name or not (checkout / "scripts" / "benchmark.py").is_file():
            raise ValueError(f"--against expects NAME=PATH to a jlora checkout, got {spec!r}")
        out[f"jlora@{name}"] = checkout
    return out


def build(args):
    """The system this worker hosts (``--worker NAME``), built on the workload's batches."""
    batches = workload_batches(args)
    if args.worker.startswith("peft"):
        return PeftSystem(args, batches, bf16=args.worker == "peft-bf16")
    return JloraSystem(args, batches, parse_variants(args.variant)[args.worker])


# --- the comparison -------------------------------------------------------------------------------------------------


def worker_argv(args) -> list[str]:
    """The command line of a worker: this run's settings."""
    names = [
        "workload",
        "rounds",
        "config",
        "batch",
        "seq_len",
        "uniform_seq",
        "dtype",
        "n_layer",
        "n_embd",
        "n_head",
        "vocab",
        "r",
    ]
    argv = [x for name in names for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    argv += ["--model", args.model] if args.model else []
    return argv + [x for v in args.variant for x in ("--variant", v)]


def compare(args) -> dict:
    argv = worker_argv(args)
    batches = workload_batches(args)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    flops = [useful_flops(b, args) for b in batches]
    padded = sum(b["attention_mask"].shape[0] * (b["attention_mask"].sum(axis=1).max() + 1) for b in batches[1:])
    print(f"\n== {args.workload}: useful tokens per step {statistics.mean(tokens[1:]):.0f} | load {load_average():.2f}")
    against = parse_against(args.against)
    names = [*parse_variants(args.variant), *against, *("peft-bf16" if d == "bfloat16" else "peft" for d in args.peft)]
    workers = {}
    for name in names:  # one at a time: no two compile together
        if name in against:  # the other checkout's worker: its script, its package, the same settings
            checkout = against[name]
            env = {"PYTHONPATH": str(checkout)}
            workers[name] = Worker(str(checkout / "scripts" / "benchmark.py"), "jlora", argv, env=env)
        else:
            workers[name] = Worker(__file__, name, argv)
        info = workers[name].info
        built = f"{info['shapes']} step shapes compiled in {info['compile_s']:.1f} s" if "shapes" in info else "built"
        print(f"{name} ready in {workers[name].ready_s:.0f} s: {built} ({info['dtype']}) | load {load_average():.2f}")
    rounds = alternate(workers, range(1, args.rounds + 1), warmup=[0])
    result = {"workload": args.workload, "useful_tokens": sum(tokens[1:]), "rounds": [r.__dict__ for r in rounds]}
    for name, system in workers.items():
        end = system.finish()
        times = [r.seconds[name] for r in rounds]
        result[name] = {
            "step_s": median_seconds(rounds, name),
            "tokens_per_s": statistics.median(n / s for n, s in zip(tokens[1:], times)),
            "gflops": statistics.median(f / s for f, s in zip(flops[1:], times)) / 1e9,
            "peak_rss_mb": end["peak_rss_mb"],
            **{k: v for k, v in {**system.info, **end}.items() if k not in ("ready", "peak_rss_mb")},
        }
        if "computed_tokens" in result[name]:
            result[name]["padding"] = 1 - sum(tokens[1:]) / sum(result[name]["computed_tokens"])
    result["ratios"] = {name: ratio(rounds, name, "jlora") for name in names if name != "jlora"}
    result["peft_padding"] = 1 - sum(tokens[1:]) / padded if args.workload == "qa" else 0.0
    result["load"] = summary(rounds)
    report(result)
    return result


def report(result: dict) -> None:
    for name, r in result.items():
        if not isinstance(r, dict) or "step_s" not in r:
            continue
        line = (
            f"{name:16s} step {r['step_s']:7.3f} s (median) | {r['tokens_per_s']:7.1f} useful tokens/s | "
            f"{r['gflops']:6.1f} useful GFLOP/s | peak RSS {r['peak_rss_mb']:,.0f} MB | {r['dtype']}"
        )
        if "compile_s" in r:
            line += f" | compile {r['compile_s']:.1f} s, {r['shapes']} shapes, padding {r['padding']:.0%}"
        if r.get("device_peak_bytes"):
            line += f" | device peak {r['device_peak_bytes'] / 2**20:,.0f} MB"
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in r.get("device", "")), None)
        if peak:
            line += f" | MFU {r['gflops'] / (peak * 1e3):.1%} of {r['device']}'s {peak} TFLOP/s bf16"
        print(line)
    for name, x in result["ratios"].items():
        print(f"{name} step time / jlora's: {x:.2f}x (median of per-round ratios)")
    if result["workload"] == "qa":
        print(f"PEFT's batches were {result['peft_padding']:.0%} padding")
    print(f"{result['load']['verdict']} | {result['load']['cpu']}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["qa", "uniform", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds, after one warm-up step each")
    parser.add_argument("--config", default=str(QA_CONFIG), help="LoRA, optimizer and jlora's batch layout")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512, help="the QA workload's seq_len")
    parser.add_argument("--uniform-seq", type=int, default=128)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="jlora's compute")
    add_model_arguments(parser)
    parser.add_argument(
        "--peft",
        default="float32,bfloat16",
        type=lambda s: [x for x in s.split(",") if x],
        help="PEFT's rows: float32, bfloat16 (autocast), both (default) or '' for none",
    )
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... another jlora worker")
    parser.add_argument("--against", action="append", default=[], help="NAME=PATH: jlora from another checkout too")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a 1-layer, 32-wide model, one round (a check)")
    parser.add_argument("--model", help="a real model: a Hugging Face folder, a GGUF file or smollm2 (default: random)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK, quick=False)
    if any(d not in ("float32", "bfloat16") for d in args.peft):
        parser.error(f"--peft takes float32 and/or bfloat16, got {','.join(args.peft)}")
    try:
        parse_variants(args.variant)
        parse_against(args.against)
    except ValueError as e:
        parser.error(str(e))
    if args.model:
        model_shape(args)
    if args.worker:
        return serve(lambda: build(args), info=lambda system: system.info())
    family = f"{args.model} (Llama family)" if getattr(args, "llama", None) else "GPT-2"
    print(
        f"{family} L={args.n_layer} D={args.n_embd} H={args.n_head} V={args.vocab} | LoRA r={args.r} "
        f"alpha={2 * args.r} on {','.join(targets(args))}, AdamW | {cpu_name()} | load {load_average():.2f}",
        flush=True,
    )
    results = []
    for workload in ("qa", "uniform") if args.workload == "both" else (args.workload,):
        args.workload = workload
        results.append(compare(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
