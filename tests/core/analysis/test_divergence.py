"""KL divergence and the forgetting sums, against float64 numpy."""

import jax
import numpy as np
import pytest

import jlora
from jlora.core.analysis.divergence import forgetting_sums, kl_divergence


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("spread", [1e-4, 1.0, 40.0])
def test_kl_divergence_against_float64(spread):
    t = jax.random.normal(jax.random.key(0), (6, 257)) * 0.1
    s = t + spread * jax.random.normal(jax.random.key(1), t.shape)
    log_p, log_q = log_softmax(np.asarray(t, np.float64)), log_softmax(np.asarray(s, np.float64))
    expected = np.sum(np.exp(log_p) * (log_p - log_q), -1)
    got = np.asarray(kl_divergence(t, s), np.float64)
    # nearly equal logits: KL ~ 1e-9, far below float32 resolution of log-probabilities near log(257)
    np.testing.assert_allclose(got, expected, rtol=2e-3 if spread < 1 else 1e-4)
    assert np.all(got >= 0)


def test_forgetting_sums_against_numpy(random_b):
    config = jlora.GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    model = jlora.GPT2(config, jlora.LoraConfig(r=4, alpha=8))
    params = jlora.init_params(jax.random.key(0), config)
    variables = {"params": params, "lora": random_b(jlora.init_lora(jax.random.key(1), model, params), scale=1.0)}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 101, (3, 9)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": (rng.random((3, 8)) < 0.6).astype(np.float32),
    }
    got = [float(x) for x in forgetting_sums(model, variables, {"params": params}, batch)]

    log_q = log_softmax(np.asarray(model.apply(variables, batch["input_ids"]), np.float64))  # adapted
    log_p = log_softmax(np.asarray(model.apply({"params": params}, batch["input_ids"]), np.float64))  # base
    mask = batch["loss_mask"]
    nll = lambda logp: -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]  # noqa: E731
    kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)
    expected = [(nll(log_q) * mask).sum(), (nll(log_p) * mask).sum(), (kl * mask).sum(), mask.sum()]
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    assert got[2] > 0 and got[0] != got[1]  # the adapter moved the predictions
