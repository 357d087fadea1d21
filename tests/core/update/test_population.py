"""A population of adapters against solo runs: member k of one vmapped step is the solo run with its settings.

Four members differ in rank (padded to the largest), alpha, rsLoRA, initialisation seed, dropout key,
learning rate and LoRA+ ratio; ln_f trains beside the adapters (a copy per member); dropout is on.
On 4 CPU devices (in a subprocess: XLA_FLAGS must be set before JAX starts) the population's step is jit
over a mesh that spreads the members over the devices (and, with fsdp, the base), and every member is
still its solo run on one device: one dropout key per member for the whole batch, however it is split.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jlora
from jlora.core.update.population import (
    Member,
    init_population,
    make_population_step,
    member_keys,
    population,
    split_member,
    stack_variables,
)
from jlora.errors import ConfigError

CONFIG = jlora.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=4)
TARGETS = ("c_attn", "mlp.c_proj")
OPTIM = jlora.OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6, weight_decay=0.05, clip_norm=1.0)
STEPS = 6
# (r, alpha, rslora, seed, lr, loraplus_ratio): every member differs from the others in several
SETTINGS = [
    (1, 2.0, False, 0, 1e-2, None),
    (2, 16.0, False, 1, 3e-3, 4.0),
    (4, 8.0, True, 2, 2e-2, None),
    (8, 16.0, False, 3, 5e-3, None),
]


def members() -> list[Member]:
    return [
        Member(jlora.LoraConfig(r=r, alpha=a, rslora=rs, dropout=0.1, target_modules=TARGETS), lr=lr, loraplus_ratio=lp)
        for r, a, rs, _, lr, lp in SETTINGS
    ]


def seeds() -> list[int]:
    return [s[3] for s in SETTINGS]


@functools.cache
def params():
    return jlora.init_params(jax.random.key(0), CONFIG)


def batch(i: int, rows: int = 8, length: int = 12) -> dict:
    rng = np.random.default_rng(i)
    ids = rng.integers(0, 100, (rows, length + 1)).astype(np.int32)
    mask = (rng.random((rows, length)) < 0.7).astype(np.float32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def initial_lora(member: Member, seed: int, base) -> dict:
    return jlora.init_lora(jax.random.fold_in(jax.random.key(seed), 1), member.lora, base)


def solo(member: Member, seed: int, n_devices: int = 1) -> dict:
    """A solo run with the member's settings: losses (STEPS,), final trainable leaves by path."""
    base = params()
    model = jlora.GPT2(CONFIG, member.lora)
    variables = {"params": base, "lora": initial_lora(member, seed, base)}
    mask = jlora.trainable_mask(variables, modules_to_save=("ln_f",))
    cfg = dataclasses.replace(OPTIM, lr=member.lr, loraplus_ratio=member.loraplus_ratio)
    optimizer = jlora.make_optimizer(cfg, jlora.partition(variables, mask)[0])
    state = jlora.init_state(variables, mask, optimizer)
    step = jlora.make_train_step(model, optimizer, cfg, n_devices=n_devices)
    state = step.place(state)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, batch(i), jax.random.key(seed))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "trainable": jlora.tree.leaves_by_path(jlora.fetch(state.trainable))}


def run_population(n_devices: int = 1, fsdp: int = 1) -> dict:
    """The population's losses (K, STEPS), every member split out, and the padding."""
    base = params()
    ms = members()
    pop = population(ms, base)
    model = jlora.GPT2(CONFIG, ms[0].lora)
    variables = stack_variables(base, [initial_lora(m, s, base) for m, s in zip(ms, seeds())], pop)
    mask = jlora.trainable_mask(variables, modules_to_save=("ln_f",))
    state = init_population(variables, mask, OPTIM, pop)
    step = make_population_step(model, OPTIM, pop, n_devices=n_devices, fsdp=fsdp)
    state = step.place(state)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, batch(i), member_keys(seeds()))
        losses.append(np.asarray(metrics["loss"]).tolist())
    mesh = step.placement.shape
    state = state.replace(trainable=jlora.fetch(state.trainable), frozen=jlora.fetch(state.frozen))
    padded = jlora.flatten_adapters(state.trainable["lora"])
    return {
        "mesh": mesh,
        "losses": np.asarray(losses).T.tolist(),  # (K, STEPS)
        "members": [
            {
                p: np.asarray(x).tolist()
                for p, x in jlora.tree.leaves_by_path(split_member(state.trainable, k, pop)).items()
            }
            for k in range(pop.size)
        ],
        "padding": {
            path: [
                [float(np.abs(np.asarray(a["A"][k, m.lora.r :])).max(initial=0.0)) for k, m in enumerate(ms)],
                [float(np.abs(np.asarray(a["B"][k, :, m.lora.r :])).max(initial=0.0)) for k, m in enumerate(ms)],
            ]
            for path, a in padded.items()
        },
        "frozen_same": all(
            np.array_equal(x, y)
            for x, y in zip(
                jax.tree.leaves(state.frozen["params"]), jax.tree.leaves(jlora.partition(variables, mask)[1]["params"])
            )
        ),
    }


@pytest.fixture(scope="module")
def solos():
    return [solo(m, s) for m, s in zip(members(), seeds())]


@pytest.fixture(scope="module")
def pop_result():
    return run_population()


def check_against_solos(result: dict, solos: list[dict]) -> None:
    for k, reference in enumerate(solos):
        np.testing.assert_allclose(result["losses"][k], reference["losses"], rtol=0, atol=1e-5, err_msg=f"member {k}")
        member = result["members"][k]
        assert member.keys() == reference["trainable"].keys()  # the lora leaves at their true rank, and ln_f
        for path, expected in reference["trainable"].items():
            assert np.shape(member[path]) == expected.shape, path
            np.testing.assert_allclose(member[path], expected, rtol=0, atol=1e-5, err_msg=f"member {k} {path}")


def test_members_reproduce_solo_runs(pop_result, solos):
    check_against_solos(pop_result, solos)
    losses = np.asarray(pop_result["losses"])
    assert len({round(x, 6) for x in losses[:, -1]}) == 4  # the members really did train differently
    assert pop_result["frozen_same"]


def test_padding_stays_exactly_zero(pop_result):
    assert set(pop_result["padding"]) == {"h.0.attn.c_attn", "h.0.mlp.c_proj"}
    for path, (a_pad, b_pad) in pop_result["padding"].items():
        assert a_pad == [0.0] * 4 and b_pad == [0.0] * 4, path


def test_members_must_adapt_the_same_modules():
    lora = jlora.LoraConfig(r=2, alpha=4)
    with pytest.raises(ConfigError, match="member 1 adapts other modules"):
        population([Member(lora, 1e-3), Member(lora.replace(target_modules=("c_fc",)), 1e-3)], params())
    with pytest.raises(ConfigError, match="member 1 has LoRA dropout 0.1"):
        population([Member(lora, 1e-3), Member(lora.replace(dropout=0.1), 1e-3)], params())


REPO = Path(__file__).resolve().parents[2]


def test_on_four_devices(solos):
    """jit over 4 devices: the 4 members one a device (mesh 4 x 1 x 1), and two a device pair with the base
    split over the pair (mesh 2 x 1 x 2); each member is its solo run on one device, and so is a solo run
    on 4 devices (the batch split 4 ways)."""
    from ...conftest import xla_devices  # here: the subprocess below loads this module on its own

    env = {**os.environ, "XLA_FLAGS": xla_devices(4), "JAX_PLATFORMS": "cpu"}
    code = (
        "import importlib.util, json, jax; assert jax.local_device_count() == 4\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(Path(__file__))!r})\n"
        "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
        "solo = t.solo(t.members()[1], t.seeds()[1], n_devices=4)\n"
        "solo['trainable'] = {p: x.tolist() for p, x in solo['trainable'].items()}\n"
        "out = {'members': t.run_population(n_devices=4), 'fsdp': t.run_population(n_devices=4, fsdp=2)}\n"
        "print('RESULT ' + json.dumps({**out, 'solo': solo}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert result["members"]["mesh"] == {"member": 4, "data": 1, "fsdp": 1}
    assert result["fsdp"]["mesh"] == {"member": 2, "data": 1, "fsdp": 2}
    for run in (result["members"], result["fsdp"]):
        check_against_solos(run, solos)  # every member, against its solo run on one device
        assert all(a == [0.0] * 4 and b == [0.0] * 4 for a, b in run["padding"].values())
        assert run["frozen_same"]
    solo = {**result["solo"], "trainable": {p: np.asarray(x) for p, x in result["solo"]["trainable"].items()}}
    check_against_solos({"losses": [solo["losses"]], "members": [solo["trainable"]]}, [solos[1]])


def test_survivors_go_on_as_a_smaller_population_exactly():
    """Members 0 and 2 (r 1, 4) taken out of the 4 (padded to r 8) after 3 steps go on at padded rank 4 with
    the losses and adapters of the population of those two alone; put back, the whole tree is unchanged."""
    from jlora.core.update.population import put_members, subset, take_members

    base, ms, keep = params(), members(), [0, 2]
    model = jlora.GPT2(CONFIG, ms[0].lora)

    def start(chosen):
        pop = population([ms[k] for k in chosen], base)
        variables = stack_variables(base, [initial_lora(ms[k], seeds()[k], base) for k in chosen], pop)
        mask = jlora.trainable_mask(variables, modules_to_save=("ln_f",))
        return pop, init_population(variables, mask, OPTIM, pop)

    def steps(pop, state, chosen, at):
        step, losses = make_population_step(model, OPTIM, pop, n_devices=1), []
        for i in at:
            state, metrics = step(state, batch(i), member_keys([seeds()[k] for k in chosen]))
            losses.append(np.asarray(metrics["loss"]))
        return state, np.asarray(losses)

    full_pop, state = start(range(4))
    state, _ = steps(full_pop, state, range(4), range(3))
    small_pop = subset(full_pop, keep)
    assert small_pop.ranks == {"h.0.attn.c_attn": 4, "h.0.mlp.c_proj": 4} and small_pop.loraplus_ratio is not None
    variables = stack_variables(base, [initial_lora(ms[k], seeds()[k], base) for k in keep], small_pop)
    like = init_population(variables, jlora.trainable_mask(variables, modules_to_save=("ln_f",)), OPTIM, small_pop)
    host = jax.device_get((state.trainable, state.opt_state))
    taken = tuple(take_members(tree, keep, shape) for tree, shape in zip(host, (like.trainable, like.opt_state)))
    back = put_members(host, taken, keep)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(host)):
        np.testing.assert_array_equal(x, y)  # exact, the padding past r 4 included
    shrunk = like.replace(step=state.step, trainable=taken[0], opt_state=taken[1])
    _, went_on = steps(small_pop, shrunk, keep, range(3, 6))

    alone_pop, alone = start(keep)
    _, reference = steps(alone_pop, alone, keep, range(6))
    np.testing.assert_allclose(went_on, reference[3:], rtol=0, atol=1e-5)
