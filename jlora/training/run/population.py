"""`jlora train` with a ``population:`` section: K adapters trained at once by the one loop.

    trainer = population_trainer(run)     # the members' adapters stacked, one compiled (vmapped) step
    population_meta(trainer.members)      # what a checkpoint records: each member's settings

The loop, its hooks and the checkpoints are a single run's (`jlora.training.run.train`); what changes
is the trainer: its state holds the members' adapters, optimizer states and trained base leaves
stacked along a member axis (`jlora.core.population`), its step returns each metric per member,
and the hooks write a row per member. Member k's adapter seed (``seed`` in its settings) seeds A's
initialisation and its dropout keys exactly as ``adapter_seed`` does a solo run's, so member k
reproduces the solo run with its settings.
"""

from __future__ import annotations

from jlora.core.lora import init_lora
from jlora.core.optim import trainable_mask
from jlora.core.population import (
    init_population,
    make_population_eval_step,
    make_population_step,
    member_axes,
    member_keys,
    population,
    stack_variables,
)
from jlora.training.run.build import Run, Trainer, init_key
from jlora.training.run.config import population_members
from jlora.training.run.members import MemberSpec


def population_trainer(run: Run) -> Trainer:
    """The members of ``run.cfg.population`` at step 0, each initialised as its solo run would be."""
    cfg = run.cfg
    specs = tuple(population_members(cfg))
    pop = population([s.member() for s in specs], run.params)
    loras = [init_lora(init_key(s.seed), s.lora, run.params) for s in specs]
    variables = stack_variables(run.params, loras, pop)
    mask = trainable_mask(variables, bias=cfg.trainable.bias, modules_to_save=cfg.trainable.modules_to_save)
    model = run.model  # its LoraConfig's targets and dropout are every member's; the scalings come with the state
    return Trainer(
        run,
        init_population(variables, mask, cfg.optim, pop),
        mask,
        member_keys([s.seed for s in specs]),
        lambda n_devices: make_population_step(model, cfg.optim, pop, n_devices=n_devices),
        lambda n_devices: make_population_eval_step(model, mask, n_devices=n_devices),
        members=specs,
        axes=member_axes(mask),
    )


def population_meta(members: tuple[MemberSpec, ...] | None) -> dict:
    """The checkpoint meta's ``population`` entry (each member's settings), or nothing for a single adapter."""
    return {} if members is None else {"population": [m.to_dict() for m in members]}
