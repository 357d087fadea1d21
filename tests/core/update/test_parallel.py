"""Data parallelism: the pmapped step on 4 CPU devices equals the single-device step.

Several CPU devices exist only if XLA_FLAGS is set before JAX starts, so that comparison runs in
a subprocess; the pure helpers are checked here on this process's single device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jlora.core.update.parallel import initialize_distributed, replicate, shard_batch, unreplicate

from ...conftest import xla_devices

REPO = Path(__file__).resolve().parents[2]

PMAP_CHECK = r"""
import json
import jax, numpy as np, jlora

assert jax.local_device_count() == 4, jax.devices()
config = jlora.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=4)
model = jlora.GPT2(config, jlora.LoraConfig(r=4, alpha=8))
params = jlora.init_params(jax.random.key(0), config)
lora = jlora.init_lora(jax.random.key(1), model, params)
lora = jax.tree_util.tree_map_with_path(  # B != 0, so that A learns from the first step
    lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if p[-1].key == "B" else x, lora
)
variables = {"params": params, "lora": lora}
mask = jlora.trainable_mask(variables, modules_to_save=("ln_f",))
cfg = jlora.OptimConfig(lr=1e-3, weight_decay=0.01, loraplus_ratio=4.0)


def batch(seed, rows=8, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (rows, length + 1)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    for i in range(rows):  # each row its own answer span, so devices see different token counts
        start = rng.integers(0, length - 2)
        mask[i, start : rng.integers(start + 1, length + 1)] = 1
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def run(n, dropout=False, steps=3, evaluate=True):
    optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
    state = jlora.init_state(variables, mask, optimizer)
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=n, dropout=dropout)
    if n > 1:
        state = jlora.replicate(state, n)
    put = (lambda b: jlora.shard_batch(b, n)) if n > 1 else (lambda b: b)
    get = jlora.unreplicate if n > 1 else (lambda x: x)
    losses = []
    for i in range(steps):
        state, metrics = step(state, put(batch(i)), jax.random.key(7))
        losses.append(float(get(metrics)["loss"]))
    if evaluate:
        loss_sum, tokens = get(jlora.make_eval_step(model, n_devices=n)(state, put(batch(99))))
    state = get(state)
    trainable = [np.asarray(x).tolist() for x in jax.tree.leaves(state.trainable)]
    start = jax.tree.leaves(jlora.partition(variables, mask)[1])
    frozen_same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.frozen), start, strict=True))
    evaluation = [float(loss_sum), float(tokens)] if evaluate else None
    return {"losses": losses, "eval": evaluation, "trainable": trainable, "frozen_same": frozen_same}


out = {"single": run(1), "pmap": run(4), "pmap_dropout": run(4, dropout=True, steps=2, evaluate=False)}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def pmap_result():
    env = {**os.environ, "XLA_FLAGS": xla_devices(4), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", PMAP_CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_pmap_step_equals_single_device_step(pmap_result):
    single, pmap = pmap_result["single"], pmap_result["pmap"]
    np.testing.assert_allclose(pmap["losses"], single["losses"], rtol=0, atol=1e-5)
    assert len(single["trainable"]) == 2 + 2  # A, B of the one layer; ln_f scale and bias
    for a, b in zip(pmap["trainable"], single["trainable"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pmap["eval"], single["eval"], rtol=1e-6)
    assert single["frozen_same"] and pmap["frozen_same"]


def test_pmap_step_with_dropout_trains(pmap_result):
    result = pmap_result["pmap_dropout"]
    assert np.isfinite(result["losses"]).all() and result["frozen_same"]
    assert result["losses"][0] != pmap_result["pmap"]["losses"][0]  # dropout is on


def test_shard_batch_and_replicate():
    batch = {"input_ids": np.arange(24).reshape(6, 4)}
    sharded = shard_batch(batch, 3)
    assert sharded["input_ids"].shape == (3, 2, 4)
    np.testing.assert_array_equal(sharded["input_ids"][1], batch["input_ids"][2:4])
    with pytest.raises(ValueError, match="6 rows does not split evenly over 4 devices"):
        shard_batch(batch, 4)

    tree = {"a": np.ones((2, 3), np.float32), "b": None}
    copies = replicate(tree, 1)
    assert copies["a"].shape == (1, 2, 3) and copies["b"] is None
    np.testing.assert_array_equal(unreplicate(copies)["a"], tree["a"])
    with pytest.raises(ValueError, match=f"n_devices={jax.local_device_count() + 1}"):
        replicate(tree, jax.local_device_count() + 1)


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JLORA_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False
