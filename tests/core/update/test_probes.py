"""The probes of the first batches against PEFT's: EVA's ranks and components, the inputs of the adapted layers,
the averaged gradient LoRA-GA starts from."""

import itertools

import jax
import numpy as np
import pytest
import torch
from peft import EvaConfig as PeftEvaConfig
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora.eva import get_eva_state_dict
from peft.utils.incremental_pca import IncrementalPCA

import jlora
from jlora.core.update.probes import eva_adapters, label_positions, layer_inputs, weight_gradients
from jlora.exchange.hf_checkpoint import load_model

from ...conftest import make_llama_checkpoint

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qa_batches(n: int, rows: int = 8, length: int = 24, vocab: int = 101, seed: int = 0) -> list[dict]:
    """Right-padded rows with a prompt and a completion, in both conventions: PEFT's labels (-100 off the
    completion) and jlora's loss_mask (on the position before each completion token)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (rows, length))
        real = np.arange(length)[None] < rng.integers(length // 2, length + 1, rows)[:, None]
        completion = real & (np.arange(length)[None] >= rng.integers(2, length // 3, rows)[:, None])
        loss_mask = np.zeros((rows, length), np.float32)
        loss_mask[:, :-1] = completion[:, 1:]
        labels = np.where(completion, ids, -100)
        out.append(
            {"input_ids": ids, "attention_mask": real.astype(np.int64), "labels": labels, "loss_mask": loss_mask}
        )
    return out


def pefts_eva(model, batches, targets, r):
    config = PeftLoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights="eva", eva_config=PeftEvaConfig()
    )
    loader = [{k: torch.tensor(b[k]) for k in ("input_ids", "attention_mask", "labels")} for b in batches]
    return get_eva_state_dict(model, loader, peft_config=config, show_progress_bar=False)


def jloras_eva(directory, batches, targets, r):
    cfg = jlora.LoraConfig(r=r, alpha=2 * r, target_modules=tuple(targets), init="eva", eva={"batches": 1000})
    model, params = load_model(directory, lora=cfg)
    ours = [{k: b[k] for k in ("input_ids", "attention_mask", "loss_mask")} for b in batches]
    return eva_adapters(model, params, cfg, itertools.cycle(ours))  # PEFT cycles its loader too


def principal_cosines(a, b) -> np.ndarray:
    """Cosines of the principal angles between the row spaces of a and b (1: the same subspace)."""
    qa, qb = np.linalg.qr(np.asarray(a, np.float64).T)[0], np.linalg.qr(np.asarray(b, np.float64).T)[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def compare(found, theirs, prefix: str) -> dict[str, float]:
    """{path: smallest principal cosine}, asserting EVA's ranks equal PEFT's layer by layer."""
    flat = jlora.flatten_adapters(found.lora)
    assert {p: k for p, k in found.ranks.items()} == {p: theirs[prefix + p].shape[0] for p in found.ranks}
    assert set(flat) == {p for p, k in found.ranks.items() if k > 0}
    return {p: principal_cosines(flat[p]["A"], theirs[prefix + p]).min() for p in flat}


@pytest.fixture(scope="module")
def tiny_llama_only(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama_eva")
    return directory, make_llama_checkpoint(directory, "llama")


def test_eva_on_gpt2_gives_pefts_ranks_and_subspaces(tiny_hf):
    """PEFT's own EVA test: GPT-2 cut to 2 layers, c_attn, r = 8."""
    directory, reference = tiny_hf
    batches = qa_batches(30)
    found = jloras_eva(directory, batches, ["c_attn"], 8)
    cosines = compare(found, pefts_eva(reference, batches, ["c_attn"], 8), "transformer.")
    assert found.converged and found.batches < 30
    assert min(cosines.values()) >= 0.99, cosines
    assert all(float(a["scaling"]) == 2.0 for a in jlora.flatten_adapters(found.lora).values())
    assert all((np.asarray(a["B"]) == 0).all() for a in jlora.flatten_adapters(found.lora).values())


def test_eva_on_llama_gives_pefts_ranks_and_subspaces(tiny_llama_only, monkeypatch):
    """Every linear module, so the layers with equal inputs (q, k, v; gate, up) share a PCA as in PEFT.

    PEFT's incremental PCA takes a randomised SVD (q = 2k columns, 4 power iterations) where jlora's is
    exact; on this random model's flat input spectra that approximation turns a subspace by a few degrees
    (a principal cosine down to about 0.97 at layers.0.mlp.down_proj, whose 3rd and 4th singular values are
    close). With PEFT's own exact SVD (``lowrank=False``) every subspace is the same to 1e-6.
    """
    directory, reference = tiny_llama_only
    batches = qa_batches(30)
    found = jloras_eva(directory, batches, LLAMA_LINEAR, 4)
    randomised = compare(found, pefts_eva(reference, batches, LLAMA_LINEAR, 4), "model.")
    assert min(randomised.values()) >= 0.95, randomised
    assert sum(c >= 0.99 for c in randomised.values()) >= len(randomised) - 1
    assert len(set(found.ranks.values())) > 1  # the budget was redistributed

    init = IncrementalPCA.__init__
    monkeypatch.setattr(IncrementalPCA, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "lowrank": False}))
    exact = compare(found, pefts_eva(reference, batches, LLAMA_LINEAR, 4), "model.")
    assert min(exact.values()) >= 1 - 1e-6, exact


def test_layer_inputs_are_what_the_torch_layers_receive(tiny_hf):
    directory, reference = tiny_hf
    model, params = load_model(directory)
    ids = qa_batches(1)[0]["input_ids"]
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach().numpy()))
        for name, m in reference.named_modules()
        if name.endswith(("c_attn", "mlp.c_proj"))
    ]
    with torch.no_grad():
        reference(torch.tensor(ids))
    for hook in hooks:
        hook.remove()
    ours = layer_inputs(model, params, ids, ("h.0.attn.c_attn", "h.1.mlp.c_proj"))
    np.testing.assert_allclose(ours["h.0.attn.c_attn"], seen["transformer.h.0.attn.c_attn"], atol=1e-5)
    np.testing.assert_allclose(ours["h.1.mlp.c_proj"], seen["transformer.h.1.mlp.c_proj"], atol=1e-5)


def test_label_positions_are_pefts_label_mask():
    batch = qa_batches(1)[0]
    expected = (batch["attention_mask"] > 0) & (batch["labels"] != -100)
    np.testing.assert_array_equal(label_positions(batch, use_label_mask=True), expected)
    np.testing.assert_array_equal(label_positions(batch, use_label_mask=False), batch["attention_mask"] > 0)


def test_weight_gradients_are_the_mean_of_each_batchs_gradient(tiny_hf):
    """PEFT's preprocess_loraga: the gradients of the user's steps summed and divided by their number."""
    directory, reference = tiny_hf
    model, params = load_model(directory)
    batches = []
    for b in qa_batches(3, rows=4, length=12):
        targets = np.roll(b["input_ids"], -1, axis=1)
        batches.append({"input_ids": b["input_ids"], "targets": targets, "loss_mask": b["loss_mask"]})
    grads = weight_gradients(model, params, batches, ("h.0.attn.c_attn", "h.1.mlp.c_fc"))
    reference.zero_grad()
    for b in batches:
        logits = reference(torch.tensor(b["input_ids"])).logits
        mask = torch.tensor(b["loss_mask"]).reshape(-1)
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.tensor(b["targets"]).reshape(-1), reduction="none"
        )
        ((losses * mask).sum() / mask.sum()).backward()
    modules = dict(reference.named_modules())
    for path, torch_name in (
        ("h.0.attn.c_attn", "transformer.h.0.attn.c_attn"),
        ("h.1.mlp.c_fc", "transformer.h.1.mlp.c_fc"),
    ):
        expected = modules[torch_name].weight.grad.numpy() / 3  # Conv1D: (d_in, d_out), the kernel's own layout
        np.testing.assert_allclose(np.asarray(grads[path]), expected, atol=2e-6, rtol=1e-4)
    assert jax.tree.leaves(grads)  # only the two kernels
    assert set(grads) == {"h.0.attn.c_attn", "h.1.mlp.c_fc"}
