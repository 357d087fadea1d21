"""Learning against forgetting: what fine-tuning on a task costs on text from outside it.

    task = pretrain(task, steps=600, lr=3e-3)      # the base first learns the held-out text's kind of text
    forgetting(task, variables)                    # {"forget_loss", "forget_base_loss", "forget_kl", "forgetting"}

The held-out text is the run config's ``eval.forgetting`` (jlora's bundled generic sentences by
default in the scripts). For a model, on its tokens: the loss of the model, the loss of the base
it was fine-tuned from, their difference ("forgetting": how much worse it got), and the mean
per-token KL(base || model) (`jlora.core.analysis.divergence`), how far its predictions moved whatever the
losses. Adapters are merged first, so one compiled evaluation of the plain base model serves
every LoRA rank and the full fine-tune (Biderman et al., 2024: "LoRA learns less and forgets less").

A randomly initialised base knows nothing to forget; `pretrain` first trains it in full on the
held-out text, so that fine-tuning on the task has something to lose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jlora.errors import ConfigError
from jlora.research.experiments import Task, fit, lora_mask, merged_params
from jlora.training.run.evaluate import mean_sums


def forgetting(task: Task, variables: Mapping) -> dict:
    """The model's loss on the task's held-out text beside its base's, and the mean KL(base || model).

    Returns:
      {"forget_loss", "forget_base_loss", "forget_kl", "forgetting" = forget_loss - forget_base_loss}.
    """
    data = task.run.forgetting
    if data is None:
        raise ConfigError("forgetting needs held-out text: set eval.forgetting (a JSONL text file, or bundled)")
    inputs = {"adapted": {"params": merged_params(variables)}, "base": {"params": task.run.params}}
    batch_size, max_batches = task.cfg.batch_size, task.cfg.eval_batches
    loss, base_loss, kl = mean_sums(task.forget_step, inputs, data, batch_size, max_batches=max_batches)
    return {"forget_loss": loss, "forget_base_loss": base_loss, "forget_kl": kl, "forgetting": loss - base_loss}


def pretrain(task: Task, steps: int, lr: float | None = None, *, progress: bool = False) -> Task:
    """`task` on a base first trained in full for `steps` updates on its held-out text (lr: the config's).

    The new base replaces the old one everywhere in the task (fine-tuning starts from it, and
    forgetting is measured against it).
    """
    if task.run.forgetting is None:
        raise ConfigError("pretrain needs held-out text: set eval.forgetting (a JSONL text file, or bundled)")
    cfg = task.cfg
    optim = dataclasses.replace(cfg.optim, lr=cfg.optim.lr if lr is None else lr, total_steps=steps)
    text_cfg = dataclasses.replace(
        cfg,
        steps=steps,
        optim=optim,
        # every top-level module of the base (GPT-2's wte, wpe, h, ln_f; a Llama's embed_tokens, layers, norm...)
        trainable=dataclasses.replace(cfg.trainable, modules_to_save=tuple(task.run.params)),
    )
    variables = {"params": task.run.params}
    text_task = dataclasses.replace(task, train=task.run.forgetting)
    trained = fit(text_task, variables, lora_mask(variables, text_cfg), text_cfg, progress=progress, desc="pretrain")
    run = dataclasses.replace(task.run, params=trained.variables["params"])
    return dataclasses.replace(task, run=run)
