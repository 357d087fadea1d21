"""One placement: the step jit-compiled over a 4-device mesh (data parallel, the base split over "fsdp",
both) equals the single-device step, dropout and micro-batches included.

Several CPU devices exist only if XLA_FLAGS is set before JAX starts, so those comparisons run in a
subprocess; the mesh's shape and shardings are checked here on this process's single device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora.core.update.mesh import Placement, fetch, initialize_distributed, mesh_placement
from jlora.errors import ConfigError

from ...conftest import xla_devices

REPO = Path(__file__).resolve().parents[2]

MESH_CHECK = r"""
import json
import jax, numpy as np, jlora

assert jax.local_device_count() == 4, jax.devices()
config = jlora.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=4)
model = jlora.GPT2(config, jlora.LoraConfig(r=4, alpha=8, dropout=0.1))
params = jlora.init_params(jax.random.key(0), config)
lora = jlora.init_lora(jax.random.key(1), model, params)
lora = jax.tree_util.tree_map_with_path(  # B != 0, so that A learns from the first step
    lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if p[-1].key == "B" else x, lora
)
variables = {"params": params, "lora": lora}
mask = jlora.trainable_mask(variables, modules_to_save=("ln_f",))


def batch(seed, rows=8, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (rows, length + 1)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    for i in range(rows):  # each row its own answer span, so devices see different token counts
        start = rng.integers(0, length - 2)
        mask[i, start : rng.integers(start + 1, length + 1)] = 1
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def run(n, fsdp=1, dropout=False, grad_accum=1, steps=3):
    cfg = jlora.OptimConfig(lr=1e-3, weight_decay=0.01, loraplus_ratio=4.0, grad_accum=grad_accum)
    optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=n, fsdp=fsdp, dropout=dropout)
    state = step.place(jlora.init_state(variables, mask, optimizer))
    placed = state.frozen
    losses = []
    for i in range(steps):
        state, metrics = step(state, batch(i), jax.random.key(7))
        losses.append(float(metrics["loss"]))
    loss_sum, tokens = jlora.make_eval_step(model, placement=step.placement)(state, batch(99))
    trainable = [np.asarray(x).tolist() for x in jax.tree.leaves(jlora.fetch(state.trainable))]
    start = jax.tree.leaves(jlora.partition(variables, mask)[1])
    frozen = jax.tree.leaves(jlora.fetch(state.frozen))
    return {
        "mesh": step.placement.shape,
        "losses": losses,
        "eval": [float(loss_sum), float(tokens)],
        "trainable": trainable,
        "frozen_same": all(np.array_equal(a, b) for a, b in zip(frozen, start, strict=True)),
        "frozen_kept": all(a is b for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(placed))),
    }


out = {}
for name, options in {
    "data": dict(n=4),
    "fsdp4": dict(n=4, fsdp=4),
    "data2_fsdp2": dict(n=4, fsdp=2),
}.items():
    out[name] = run(**options)
    out[name + "_dropout_accum"] = run(**options, dropout=True, grad_accum=2)
out["single"] = run(1)
out["single_dropout_accum"] = run(1, dropout=True, grad_accum=2)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_result():
    env = {**os.environ, "XLA_FLAGS": xla_devices(4), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", MESH_CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def same_run(run: dict, single: dict) -> None:
    np.testing.assert_allclose(run["losses"], single["losses"], rtol=0, atol=1e-5)
    assert len(single["trainable"]) == 2 + 2  # A, B of the one layer; ln_f scale and bias
    for a, b in zip(run["trainable"], single["trainable"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(run["eval"], single["eval"], rtol=1e-6)
    assert run["frozen_same"] and run["frozen_kept"]


@pytest.mark.parametrize(
    ("name", "mesh"),
    [
        ("data", {"member": 1, "data": 4, "fsdp": 1}),
        ("fsdp4", {"member": 1, "data": 1, "fsdp": 4}),
        ("data2_fsdp2", {"member": 1, "data": 2, "fsdp": 2}),
    ],
)
def test_a_step_on_four_devices_equals_the_single_device_step(mesh_result, name, mesh):
    """Data parallel, FSDP and both: the same losses, adapters, ln_f and evaluation as one device."""
    assert mesh_result[name]["mesh"] == mesh and mesh_result["single"]["mesh"] == {"member": 1, "data": 1, "fsdp": 1}
    same_run(mesh_result[name], mesh_result["single"])


@pytest.mark.parametrize("name", ["data", "fsdp4", "data2_fsdp2"])
def test_dropout_and_micro_batches_are_the_single_device_ones(mesh_result, name):
    """One dropout key for the whole batch: with dropout on and 2 micro-batches, 4 devices still equal one
    (under pmap each device folded in its index, and only "it trains" could be checked)."""
    single = mesh_result["single_dropout_accum"]
    assert single["losses"][0] != mesh_result["single"]["losses"][0]  # dropout is on
    same_run(mesh_result[name + "_dropout_accum"], single)


def test_one_device_mesh_and_shardings():
    p = mesh_placement(8, devices=jax.local_devices()[:1])
    assert p.shape == {"member": 1, "data": 1, "fsdp": 1} and p.row_devices == 1 and p.size == 1
    assert p.rows.spec == jax.sharding.PartitionSpec(("member", "data", "fsdp"))
    assert p.members.spec == p.whole.spec == jax.sharding.PartitionSpec()
    with pytest.raises(ConfigError, match=r"mesh.fsdp=2 must be >= 1 and divide the 1 devices"):
        mesh_placement(devices=jax.local_devices()[:1], fsdp=2)
    with pytest.raises(ValueError, match=f"n_devices={jax.local_device_count() + 1}"):
        mesh_placement(devices=jax.local_device_count() + 1)


def test_base_sharding_picks_the_largest_dimension_fsdp_divides():
    """The rule read on an abstract ("member" 1, "data" 1, "fsdp" 4) mesh: no devices needed."""
    p = jlora.Placement(jax.sharding.AbstractMesh((1, 1, 4), ("member", "data", "fsdp")))
    spec = lambda x: x.spec  # noqa: E731
    assert spec(p.base_sharding((257, 32))) == P(None, "fsdp")  # 257 is odd
    assert spec(p.base_sharding((128, 32))) == P("fsdp", None)
    assert spec(p.base_sharding((32, 32))) == P("fsdp", None)  # equals: the first
    assert spec(p.base_sharding((2, 8, 4))) == P(None, "fsdp", None)
    assert spec(p.base_sharding((96,))) == P()  # 1-D: whole
    with pytest.raises(
        ConfigError, match=r"mesh.fsdp=4 divides no dimension of the base weight wte.embedding \(257, 30\)"
    ):
        p.tree_shardings({"wte": {"embedding": np.zeros((257, 30))}})
    tree = {"params": {"w": np.zeros((8, 4)), "b": np.zeros(8)}, "lora": {"h": {"A": np.zeros((4, 8))}}}
    assert jax.tree.map(spec, p.tree_shardings(tree)) == {
        "params": {"w": P("fsdp", None), "b": P()},
        "lora": {"h": {"A": P()}},
    }
    stacked = Placement(jax.sharding.AbstractMesh((2, 1, 2), ("member", "data", "fsdp")))
    axes = {"params": {"w": None, "b": 0}, "lora": 0}  # a population's: the base shared, ln_f-like b trained
    got = jax.tree.map(spec, stacked.tree_shardings(tree, axes))
    assert got == {"params": {"w": P("fsdp", None), "b": P("member")}, "lora": {"h": {"A": P("member")}}}
    assert stacked.rows.spec == P(("data", "fsdp")) and stacked.row_devices == 2


def test_place_batch_and_fetch_on_one_device():
    p = mesh_placement(devices=1)
    batch = p.place_batch({"input_ids": np.arange(24).reshape(6, 4)})
    assert batch["input_ids"].sharding.is_equivalent_to(p.rows, 2)
    host = fetch({"a": batch["input_ids"], "b": None})
    assert isinstance(host["a"], np.ndarray) and host["b"] is None
    np.testing.assert_array_equal(host["a"], np.arange(24).reshape(6, 4))


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JLORA_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False
