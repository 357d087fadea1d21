"""Shared fixtures: tiny Hugging Face GPT-2 checkpoints made offline with transformers.

They are the numerical reference for the Flax model (their PyTorch logits) and stand in
for Hub checkpoints, which cannot be downloaded here.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

# One persistent XLA compilation cache for the whole session, this process and the `jlora`
# subprocesses the tests start: identical programs (the same tiny model trained, resumed,
# exported) compile once. A fresh folder each session, so nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jlora-xla-cache-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # made here: removed at the end
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The tests' models are tiny: compiling them costs far more than running them. LLVM's cheapest
# optimisation level cuts compile time by about a third (this process and the subprocesses,
# which inherit it); a run that sets XLA_FLAGS itself keeps its own.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def xla_devices(n: int) -> str:
    """XLA_FLAGS for a subprocess with `n` CPU devices, keeping this session's flags: code generation
    settings change float rounding, and a random base must hash the same in every process of a test."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


# The slowest modules (each a minute or more of training runs and subprocesses) go first: under
# `-n 2 --dist loadscope` a worker takes a module whole, and a long one left to the end keeps one
# worker busy while the other has nothing to do.
SLOW_FIRST = (
    "tests/research/test_research_scripts.py",
    "tests/training/run/test_search.py",
    "tests/training/run/test_train.py",
    "tests/training/run/test_population_run.py",
    "tests/scripts/test_device_check.py",
    "tests/scripts/test_e2e.py",
    "tests/cli/test_evaluate.py",
    "tests/scripts/test_benchmarks.py",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))  # stable: the rest as collected


def pytest_sessionfinish(session):
    if "_OWN_CACHE" in globals() and not hasattr(session.config, "workerinput"):  # the controller, not a worker
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


TINY = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=100, eos_token_id=100)
SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def make_hf_checkpoint(directory, seed: int = 0, **config):
    """Save a randomly initialised transformers GPT2LMHeadModel; returns the torch model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms trivial: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(directory, torch model) of a 2-layer, 32-wide GPT-2."""
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    return directory, make_hf_checkpoint(directory, **TINY)


@pytest.fixture(scope="session")
def small_hf(tmp_path_factory):
    """(directory, torch model) of a randomly initialised GPT-2-small-shaped checkpoint."""
    directory = tmp_path_factory.mktemp("small_gpt2")
    return directory, make_hf_checkpoint(directory, seed=1, **SMALL)


def save_byte_level_tokenizer(directory) -> int:
    """A GPT-2 tokenizer with no merges (GPT-2's 256 byte symbols + end-of-text); returns its size."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    GPT2TokenizerFast(vocab=vocab, merges=[]).save_pretrained(directory)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_hf_with_tokenizer(tmp_path_factory):
    """A 2-layer GPT-2 checkpoint with 512 positions and a byte-level GPT-2 tokenizer beside it."""
    directory = tmp_path_factory.mktemp("gpt2_with_tokenizer")
    n_vocab = save_byte_level_tokenizer(directory)
    eot = n_vocab - 1
    make_hf_checkpoint(
        directory,
        vocab_size=n_vocab,
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    return directory


def _random_b(tree, seed: int = 1, scale: float = 0.1, decay: float = 1.0):
    """`tree` with every leaf named "B" replaced by scale * N(0, 1) (column j times decay**j).

    B = 0 at initialisation hides a wrong scaling, layout or merge: tests give adapters a random
    B, as if trained. `decay` < 1 spreads the singular values of B A apart. Works on a LoRA tree,
    a single adapter or the model's whole variables.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    factors = [i for i, (p, _) in enumerate(leaves) if getattr(p[-1], "key", None) != "scaling"]  # not the scales
    keys = dict(zip(factors, jax.random.split(jax.random.key(seed), len(factors))))

    def fill(i, path, x):
        if getattr(path[-1], "key", None) != "B":
            return x
        return scale * jax.random.normal(keys[i], x.shape) * decay ** jax.numpy.arange(x.shape[-1])

    return treedef.unflatten([fill(i, p, x) for i, (p, x) in enumerate(leaves)])


@pytest.fixture(scope="session")
def random_b():
    """``random_b(tree, seed=1, scale=0.1, decay=1.0)``: adapters with a random B (see `_random_b`)."""
    return _random_b


# Runs of the packaged configs shrunk to seconds, for the command-line and README tests. Tests that
# train in a subprocess use the same settings, so their programs come from the persistent compilation
# cache. TINY_DEFAULT: the embedded default's kind of run (random base, byte tokens, 64 positions),
# 1 layer and 3 steps, a large learning rate without warmup so that the adapters and ln_f move visibly.
# The tiny runs cost their compilations: BUCKETS keeps every batch of 64 positions one shape (the default
# octave buckets would compile 56 and 64; tests/training/data/test_batching.py tests the bucket rules).
BUCKETS = "data.buckets=64"
TINY_DEFAULT = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
    BUCKETS,
    "steps=3",
    "optim.warmup_steps=0",
    "optim.lr=0.05",
    "eval_every=3",
    "checkpoint.every=3",
    "eval_batches=2",
    "exact_match=16",
]

# gpt2_qa on a local tiny checkpoint (tiny_hf_with_tokenizer: 257 tokens, 512 positions), shrunk.
TINY_QA = [BUCKETS, "seq_len=64", "batch_size=4", "steps=2", "eval_batches=1", "exact_match=0", "checkpoint.every=2"]
TINY_QA += ["optim.warmup_steps=0", "optim.lr=0.05"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="session")
def default_run_and_log(tmp_path_factory):
    """(RUN_DIR, what it wrote on stderr) of `jlora train` (the default config, by name) with TINY_DEFAULT."""
    import contextlib
    import io

    from jlora.cli import main

    run, stderr = tmp_path_factory.mktemp("default_run"), io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["train", "default", *sets(*TINY_DEFAULT), "--out", str(run)]) == 0
    return run, stderr.getvalue()


@pytest.fixture(scope="session")
def default_run(default_run_and_log):
    return default_run_and_log[0]


def unused_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused): a Hub that cannot be reached."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def population_run(tmp_path_factory):
    """RUN_DIR of `jlora train` with a population of 3 (r = 1, 2, 4) on TINY_DEFAULT's model and base, 2 steps,
    without trained base leaves (so its members can share one base in a mixed batch)."""
    import contextlib
    import io

    from jlora.cli import main

    members = "population={members: [{r: 1, alpha: 2r}, {r: 2, alpha: 8, seed: 1}, {r: 4, alpha: 4, lr: 0.1}]}"
    short = ["steps=2", "eval_every=2", "checkpoint.every=2", "exact_match=0", "eval.forgetting=null"]
    run = tmp_path_factory.mktemp("population_run")
    with contextlib.redirect_stderr(io.StringIO()):
        args = sets(*TINY_DEFAULT, *short, "trainable.modules_to_save=[]", members)
        assert main(["train", "default", *args, "--out", str(run)]) == 0
    return run


# Tiny Llama-family checkpoints, saved by transformers: grouped-query attention, Llama 3's rope scaling and an
# untied head (llama), q/k/v biases and a tied head (qwen2), one key/value head and a sliding window (mistral).
LLAMA_FAMILY = {
    "llama": dict(
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_key_value_heads=1, sliding_window=48, tie_word_embeddings=False),
}
LLAMA_SHAPE = dict(
    vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def make_llama_checkpoint(directory, model_type: str = "llama", seed: int = 0, **config):
    """Save a randomly initialised transformers model of the Llama family; returns the torch model."""
    import torch
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    config_class = getattr(transformers, f"{names}Config")
    model_class = getattr(transformers, f"{names}ForCausalLM")
    torch.manual_seed(seed)
    model = model_class(config_class(**{**LLAMA_SHAPE, **LLAMA_FAMILY[model_type], **config})).eval()
    with torch.no_grad():  # unit norms and zero biases would hide a wrong norm or bias: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session", params=list(LLAMA_FAMILY))
def tiny_llama(request, tmp_path_factory):
    """(directory, torch model) of a 2-layer, 32-wide model of each Llama-family type."""
    directory = tmp_path_factory.mktemp(f"tiny_{request.param}")
    return directory, make_llama_checkpoint(directory, request.param)
