"""`jlora train` with a ``population:`` section: K adapters trained at once by the one loop.

    trainer = population_trainer(run)     # the members' adapters stacked, one compiled (vmapped) step
    population_meta(trainer.members)      # what a checkpoint records: each member's settings
    survivors(trainer, state, kept)       # a search's survivors: their trainer and their slice of the state

The loop, its hooks and the checkpoints are a single run's (`jlora.training.run.train`); what changes
is the trainer: its state holds the members' adapters, optimizer states and trained base leaves
stacked along a member axis (`jlora.core.update.population`), its step returns each metric per member,
and the hooks write a row per member. Member k's adapter seed (``seed`` in its settings) seeds A's
initialisation and its dropout keys exactly as ``adapter_seed`` does a solo run's, so member k
reproduces the solo run with its settings.

On several devices the members are spread over them as the run's mesh says
(`jlora.training.run.build.placement_of`: K / m members a device on m = gcd(K, n / fsdp) of them, the
batch split over the rest, the base over mesh.fsdp); the step computes what one device computes. A run
of several processes keeps every member on every device (m = 1), its batch split over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from jlora.core.lora.adapter import init_lora
from jlora.core.update.optim import trainable_mask
from jlora.core.update.population import (
    Member,
    init_population,
    make_population_eval_step,
    make_population_step,
    member_axes,
    member_keys,
    population,
    stack_variables,
    subset,
    take_members,
)
from jlora.core.update.step import TrainState
from jlora.training.run.build import Run, Trainer, init_key
from jlora.training.run.config import population_members


def population_trainer(
    run: Run, alive: Sequence[int] | None = None, members: Sequence[Member] | None = None
) -> Trainer:
    """The members of ``run.cfg.population`` (or `members`) at step 0, each initialised as its solo run would be.

    `alive` (indices into the population) keeps only those members, as a search's survivors: the
    padded ranks are theirs, and ``trainer.ids`` keeps their indices.
    """
    cfg = run.cfg
    specs = tuple(population_members(cfg) if members is None else members)
    ids = tuple(range(len(specs))) if alive is None else tuple(alive)
    pop = population(specs, run.params)
    if alive is not None:
        pop = subset(pop, ids)  # from the whole population: its LoRA+ structure, whoever is left
    chosen = tuple(specs[k] for k in ids)
    loras = [init_lora(init_key(s.seed), s.lora, run.params) for s in chosen]
    variables = stack_variables(run.params, loras, pop)
    mask = trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)
    model = run.model  # its LoraConfig's targets and dropout are every member's; the scalings come with the state
    return Trainer(
        run,
        init_population(variables, mask, cfg.optim, pop),
        mask,
        member_keys([s.seed for s in chosen]),
        lambda placement: make_population_step(model, cfg.optim, pop, placement=placement),
        lambda placement: make_population_eval_step(model, mask, placement=placement),
        members=chosen,
        axes=member_axes(mask),
        ids=ids,
    )


def survivors(trainer: Trainer, state: TrainState, kept: Sequence[int]) -> tuple[Trainer, TrainState]:
    """The trainer of members `kept` (indices into the run's population, a subset of ``trainer.ids``)
    and their slice of `state` (a host state of `trainer`'s members): adapters, trained base leaves and
    optimizer states, cut to the survivors' padded ranks. Exact: each survivor's values are unchanged."""
    new = population_trainer(trainer.run, kept)
    positions = [trainer.ids.index(k) for k in kept]
    like = new.state
    trainable = take_members(state.trainable, positions, like.trainable)
    opt_state = take_members(state.opt_state, positions, like.opt_state)
    return new, TrainState(state.step, trainable, like.frozen, opt_state)


def population_meta(members: tuple[Member, ...] | None) -> dict:
    """The checkpoint meta's ``population`` entry (each member's settings), or nothing for a single adapter."""
    return {} if members is None else {"population": [m.to_dict() for m in members]}
