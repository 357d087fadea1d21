"""`jlora train` end to end: learning, exact resume after SIGKILL, 4 devices -> 1, non-finite stop, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jlora.cli import main
from jlora.training.records.metrics import read_metrics
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
from jlora.training.run.train import train

from ...conftest import BUCKETS, xla_devices

# A 1-layer, 32-wide random GPT-2 on the bundled QA set: seconds per run on 2 cores. Rows of 38 to 58
# tokens packed 2 or 3 to a sequence of up to 128, so resuming and changing devices go through packing.
TINY = [
    "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 128, embd_pdrop: 0.0, resid_pdrop: 0.0}",
    "seq_len=128",
    BUCKETS,
    "data.pack=true",
    "batch_size=8",
    "log_every=1",
    "exact_match=8",
    "eval_every=1000",
    "eval_batches=4",
    "eval.forgetting=null",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "jlora.cli", "train", *args]
    return subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out + err


def kill_after_first_checkpoint(args: list[str], run_dir) -> None:
    """Start `jlora train` on `run_dir` and SIGKILL it once its step-4 checkpoint is committed."""
    killed = cli(*args, "--out", str(run_dir))
    first = run_dir / "checkpoints" / "4" / "meta"
    while not first.exists() and killed.poll() is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "training finished before it could be killed"


def test_resume_after_sigkill_is_exact(tmp_path):
    args = sets(*TINY, "steps=12", "checkpoint.every=4", "checkpoint.max_to_keep=2")
    reference = cli(*args, "--out", str(tmp_path / "reference"))
    kill_after_first_checkpoint(args, tmp_path / "killed")
    finish(reference)
    log = finish(cli(*args, "--out", str(tmp_path / "killed")))
    assert "resuming at step" in log
    expected, resumed = train_losses(tmp_path / "reference"), train_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == expected  # bit for bit, every step
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["step"] == 12 and 0 <= summary["exact_match"] <= 1


def test_pissa_dora_run_resumes_exactly_and_reloads_its_residual_base(tmp_path):
    """The residual base is rebuilt from the checkpoint's initial factors: on resume, load_run, generate, export."""
    from jlora.cli.generate import load_source
    from jlora.exchange.peft import load_peft
    from jlora.training.records.artifacts import load_run

    variant = ("lora.init=pissa", "lora.use_dora=true", "lora.target_modules=[c_attn, c_fc]")
    args = sets(*TINY, *variant, "exact_match=0", "data.validation=null", "steps=8", "checkpoint.every=4")
    run = tmp_path / "killed"
    kill_after_first_checkpoint(args, run)
    assert "resuming at step 4" in finish(cli(*args, "--out", str(run)))
    train(load_run_config(DEFAULT_CONFIG, args[1::2]), tmp_path / "reference", progress=False)  # uninterrupted
    assert train_losses(run) == train_losses(tmp_path / "reference")  # bit for bit, every step

    model, residual, lora, cfg, _ = load_run(run)
    _, base, plain, plain_cfg, _ = load_run(run, original_base=True)  # the rank-2r LoRA on the unmodified base
    assert (cfg.init, plain_cfg.init, plain_cfg.r) == ("pissa", "kaiming", 16)
    ids = np.arange(12)[None] % 100
    apply, apply_plain = jax.jit(model.apply), jax.jit(model.clone(lora=plain_cfg).apply)
    logits = apply({"params": residual, "lora": lora}, ids)
    assert np.abs(apply({"params": residual}, ids) - apply({"params": base}, ids)).max() > 1e-2
    np.testing.assert_allclose(apply_plain({"params": base, "lora": plain}, ids), logits, atol=1e-5)
    generate_params = load_source(str(run)).params  # what `jlora generate RUN_DIR` runs
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(generate_params), jax.tree.leaves(residual)))
    assert main(["export", str(run), "--peft", str(tmp_path / "peft")]) == 0
    exported = load_peft(tmp_path / "peft")
    assert exported.config == plain_cfg
    np.testing.assert_allclose(apply_plain({"params": base, "lora": exported.lora}, ids), logits, atol=1e-5)


def test_a_random_base_resumes_under_other_xla_flags(tmp_path):
    """A random base is drawn by numpy, not by XLA: other code generation (flags, a CPU's vector units) resumes it."""
    args = sets(*TINY, "exact_match=0", "data.validation=null", "checkpoint.every=2")
    run = str(tmp_path / "run")
    finish(cli(*args, "--set", "steps=2", "--out", run, env={"XLA_FLAGS": "--xla_backend_optimization_level=0"}))
    log = finish(cli(*args, "--set", "steps=3", "--out", run, env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}))
    assert "resuming at step 2" in log and sorted(train_losses(run)) == [1, 2, 3]


def test_checkpoint_from_four_devices_resumes_on_one(tmp_path):
    args = sets(*TINY, "steps=8", "checkpoint.every=4", "checkpoint.max_to_keep=null")
    four = {"XLA_FLAGS": xla_devices(4)}
    log = finish(cli(*args, "--out", str(tmp_path / "run"), env=four))
    assert "devices 4 (mesh member 1 x data 4 x fsdp 1)" in log
    on_four = train_losses(tmp_path / "run")
    for step in (8,):  # go back to step 4's checkpoint
        os.system(f"rm -rf {tmp_path / 'run' / 'checkpoints' / str(step)}")
    log = finish(cli(*args, "--out", str(tmp_path / "run")))
    assert "devices 1 (mesh member 1 x data 1 x fsdp 1)" in log and "resuming at step 4" in log
    single = train_losses(tmp_path / "run")
    steps = range(5, 9)
    np.testing.assert_allclose([single[s] for s in steps], [on_four[s] for s in steps], rtol=1e-5)


# `jlora train` in a process of 4 CPU devices: the base split 4 ways (mesh.fsdp=4), and 2 ways beside 2-way
# data parallelism (mesh.fsdp=2); then, in the same process, what each device holds of the base as the run
# places it (the run's own builders), and the one-line errors of a mesh that does not fit.
FSDP_CHECK = r"""
import contextlib, io, json, sys
import jax
from jlora.cli import main
from jlora.training.run.build import build_run, placement_of, solo_trainer
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config

args, out = json.loads(sys.argv[1]), sys.argv[2]
assert jax.device_count() == 4, jax.devices()
result = {}
for fsdp in (4, 2):
    sets = [*args, "--set", f"mesh.fsdp={fsdp}"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["train", *sets, "--out", f"{out}/fsdp{fsdp}"]) == 0
    cfg = load_run_config(DEFAULT_CONFIG, sets[1::2])
    trainer = solo_trainer(build_run(cfg))
    step = trainer.make_step(placement_of(cfg, trainer))
    frozen = jax.tree.leaves(step.place(trainer.state).frozen)
    held = {}
    for leaf in frozen:
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    result[fsdp] = {
        "header": log.getvalue(),
        "mesh": step.placement.shape,
        "held": held,
        "base": sum(x.nbytes for x in frozen if x.ndim >= 2),
        "small": sum(x.nbytes for x in frozen if x.ndim < 2),
    }
errors = {}
for name, bad in {
    "devices": ["mesh.fsdp=3"],
    "weight": ["mesh.fsdp=4", "model.random={n_layer: 1, n_embd: 30, n_head: 2, n_positions: 128}"],
    "batch": ["batch_size=6", "optim.grad_accum=1"],
}.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", *args, *[x for b in bad for x in ("--set", b)], "--out", f"{out}/bad-{name}"])
    errors[name] = [code, err.getvalue()]
print("RESULT " + json.dumps({"runs": result, "errors": errors}))
"""


def test_a_base_split_over_four_devices_trains_as_one_device(tmp_path):
    """mesh.fsdp=4 (each device a quarter of every base weight) and mesh.fsdp=2 (half, the batch split in two):
    the same per-step losses and final adapters as one device, dropout on (one key for the whole batch)."""
    from jlora.training.records.artifacts import load_run

    dropout = "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 128, resid_pdrop: 0.1}"
    args = sets(*TINY, dropout, "lora.dropout=0.1", "steps=4", "checkpoint.every=4", "exact_match=0")
    env = {**os.environ, "XLA_FLAGS": xla_devices(4), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-c", FSDP_CHECK, json.dumps(args), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert main(["train", *args, "--out", str(tmp_path / "single")]) == 0  # meanwhile: one device
        out, err = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))

    single = train_losses(tmp_path / "single")
    _, _, expected, _, _ = load_run(tmp_path / "single")
    assert sorted(single) == [1, 2, 3, 4]
    for fsdp, mesh in ((4, "member 1 x data 1 x fsdp 4"), (2, "member 1 x data 2 x fsdp 2")):
        run = result["runs"][str(fsdp)]
        assert f"devices 4 (mesh {mesh})" in run["header"]
        losses = train_losses(tmp_path / f"fsdp{fsdp}")
        np.testing.assert_allclose([losses[s] for s in single], list(single.values()), rtol=0, atol=1e-5)
        _, _, lora, _, _ = load_run(tmp_path / f"fsdp{fsdp}")
        for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        # each device: 1 / fsdp of the base's weights, and the small (1-D) leaves whole
        held = run["held"]
        assert len(held) == 4 and run["base"] > 10 * run["small"]
        assert max(held.values()) <= run["base"] / fsdp + run["small"]
        assert min(held.values()) >= run["base"] / fsdp  # no device holds less: the pieces are even

    errors = result["errors"]
    for name, message in {
        "devices": "mesh.fsdp=3 must be >= 1 and divide the 4 devices",
        "weight": "mesh.fsdp=4 divides no dimension of the base weight h.0.attn.c_attn.kernel (30, 90)",
        "batch": "batch_size=6 is not divisible by the 4 devices",
    }.items():
        code, err = errors[name]
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / f"bad-{name}" / "checkpoints").exists()


def test_a_blown_up_state_is_never_checkpointed(tmp_path):
    """lr 1e12 after one warm-up step: the update of step 2 leaves finite adapters (~1e12) whose logits are NaN."""
    from jlora.training.records.artifacts import load_run

    process = cli(
        *sets(*TINY, "steps=30", "optim.lr=1e12", "optim.warmup_steps=3", "checkpoint.every=1"), "--out", str(tmp_path)
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("jlora train: the trained state at step 2 is not finite")
    assert message.endswith("stopped without saving it (newest checkpoint: step 1)")
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1]
    for step in saved:  # what was saved is a usable model
        model, params, lora, _, _ = load_run(tmp_path, step)
        assert np.isfinite(model.apply({"params": params, "lora": lora}, np.arange(16)[None] % 200)).all()
    losses = train_losses(tmp_path)
    assert all(np.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "steps=0"], "steps must be > 0, got 0"),
        (["--set", "mesh.fsdp=0"], "mesh.fsdp must be >= 1 (1: every device holds the whole base), got 0"),
        (["--set", "mesh.fsdp=2"], "mesh.fsdp=2 must be >= 1 and divide the 1 devices"),
        (["missing.yaml"], "no such config file missing.yaml"),
        (["--set", "lora.target_modules=[q_proj]"], "unknown LoRA target 'q_proj'"),
        (["--set", "data.train=/nonexistent/train.jsonl"], "no such file /nonexistent/train.jsonl"),
        (["--set", "lora.init=svd"], "unknown LoRA init 'svd'; valid: kaiming, gaussian, zeros, pissa"),
        (["--set", "lora.use_dora=true", "--set", "lora.target_modules=[c_attn.v]"], "use_dora with q/k/v slice"),
        (["--set", "lora.init=olora", "--set", "lora.r=200"], "needs r <= min(d_out, d_in) = 128 at h.0.attn.c_attn"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert main(["train", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tiny_hf, capsys):
    args = ["--set", f"model={tiny_hf[0]}", "--set", "data.tokenizer=bytes", "--set", "seq_len=64"]
    assert main(["train", *args, "--out", str(tmp_path)]) == 2
    assert "has 257 tokens, more than the model's vocabulary of 101" in capsys.readouterr().err


def test_default_run_learns(tmp_path):
    """The embedded default, shortened: validation loss on answers falls from the untrained value."""
    assert (
        main(
            [
                "train",
                *sets("steps=60", "eval_every=60", "exact_match=0", "eval.forgetting=null"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    evals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[1]["val_loss"] < 0.85 * evals[0]["val_loss"]


def test_gpt2_qa_config_runs_on_a_local_checkpoint(tmp_path, tiny_hf_with_tokenizer):
    model_dir = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    args = ["configs/gpt2_qa.yaml", "--set", f"model={model_dir}", "--set", "steps=2", "--set", "exact_match=8"]
    assert main(["train", *args, "--set", "eval_batches=2", "--out", str(run)]) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (run / "checkpoints" / "2" / "adapter").exists()
    meta = json.loads((run / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["base_model"]["name"] == str(model_dir) and meta["lora_config"]["r"] == 8


def test_load_run_and_init_from_a_peft_adapter(tmp_path):
    """A run's adapter, exported to PEFT, starts a second run exactly where the first ended."""
    from jlora.exchange.peft import save_peft
    from jlora.training.records.artifacts import load_run

    first, second = tmp_path / "first", tmp_path / "second"
    common = sets(*TINY, "trainable.modules_to_save=[ln_f]", "eval_batches=4", "lora.alpha=8")
    assert main(["train", *common, "--set", "steps=6", "--out", str(first)]) == 0
    model, params, lora, lora_cfg, meta = load_run(first)
    assert lora_cfg.alpha == 8 and meta["step"] == 6
    trained_ln_f = params["ln_f"]  # load_run puts the trained ln_f into params
    saved = save_peft(
        tmp_path / "peft", lora, lora_cfg, base_model_name_or_path=None, modules_to_save={"ln_f": trained_ln_f}
    )
    again = sets("lora.alpha=16", f"init_from={saved}", "steps=2")  # the folder's alpha (8) must win
    assert main(["train", *common, *again, "--out", str(second)]) == 0
    end_of_first = [r["val_loss"] for r in read_metrics(first) if "val_loss" in r][-1]
    start_of_second = [r["val_loss"] for r in read_metrics(second) if "val_loss" in r][0]
    assert start_of_second == pytest.approx(end_of_first, rel=1e-5)
    assert load_run(second)[3].alpha == 8


def test_init_from_an_adapter_with_saved_modules(tmp_path, capsys, random_b):
    """The adapter's modules_to_save (ln_f here, not trained by the run) are part of what the run's
    checkpoints restore (load_run, export, generate), and the run resumes on its own base."""
    import jax

    import jlora
    from jlora.core.update.step import make_eval_step
    from jlora.training.run.build import build_run
    from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
    from jlora.training.run.evaluate import mean_loss

    args = sets(*TINY, "eval_every=2", "eval_batches=2", "checkpoint.every=1", "trainable.modules_to_save=[]")
    run = build_run(load_run_config(DEFAULT_CONFIG, [a for a in args if a != "--set"]))
    lora_cfg = jlora.LoraConfig(r=4, alpha=8)
    lora = random_b(jlora.init_lora(jax.random.key(5), lora_cfg, run.params))
    ln_f = jax.tree.map(lambda x: x + 0.5, run.params["ln_f"])
    jlora.save_peft(tmp_path / "peft", lora, lora_cfg, base_model_name_or_path=None, modules_to_save={"ln_f": ln_f})

    out = tmp_path / "run"
    assert main(["train", *args, "--set", f"init_from={tmp_path / 'peft'}", "--set", "steps=2", "--out", str(out)]) == 0
    model, params, trained, _, _ = jlora.load_run(out)
    for name in ("scale", "bias"):
        np.testing.assert_array_equal(params["ln_f"][name], ln_f[name])
    recorded = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r][-1]
    again = mean_loss(make_eval_step(model), {"params": params, "lora": trained}, run.val, 8, max_batches=2)
    assert again == pytest.approx(recorded, rel=1e-6)  # the checkpoint is the model the run evaluated

    assert main(["export", str(out), "--peft", str(tmp_path / "export")]) == 0
    exported = jlora.load_peft(tmp_path / "export").modules_to_save
    np.testing.assert_array_equal(exported["ln_f"]["scale"], ln_f["scale"])

    capsys.readouterr()
    assert main(["train", *args, "--set", f"init_from={tmp_path / 'peft'}", "--set", "steps=3", "--out", str(out)]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
