"""The scripts' shared pieces: a full fine-tune's dW, its rank-r truncations, loss-curve distance, run config,
nested training sets, list arguments."""

import argparse

import jax
import numpy as np
import pytest

from jlora.errors import DataError, UsageError
from jlora.research.experiments import (
    QUICK,
    add_run_arguments,
    curve_distance,
    kernel_deltas,
    numbers,
    script_config,
    take_rows,
    truncate_deltas,
)
from jlora.training.data.rows import tokenize
from jlora.training.data.sources import Example
from jlora.training.data.tokenizer import ByteTokenizer


def trees():
    keys = jax.random.split(jax.random.key(0), 6)
    before = {
        "h": {
            "0": {
                "attn": {
                    "c_attn": {"kernel": jax.random.normal(keys[0], (8, 24)), "bias": jax.random.normal(keys[1], (24,))}
                },
                "ln_2": {"scale": np.ones(8, np.float32)},
            }
        }
    }
    after = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(keys[2], x.shape), before)
    return before, after


def test_kernel_deltas_are_after_minus_before_in_maths_layout():
    before, after = trees()
    deltas = kernel_deltas(before, after, ["h.0.attn.c_attn", "h.0.attn.c_attn.v"])
    full = np.asarray(after["h"]["0"]["attn"]["c_attn"]["kernel"]) - np.asarray(
        before["h"]["0"]["attn"]["c_attn"]["kernel"]
    )
    np.testing.assert_allclose(deltas["h.0.attn.c_attn"], full.T, atol=1e-6)  # (d_out, d_in) = (24, 8)
    np.testing.assert_allclose(deltas["h.0.attn.c_attn.v"], full[:, 16:].T, atol=1e-6)  # v: the last third


def test_truncations_are_eckart_young_and_keep_other_leaves():
    before, after = trees()
    out = truncate_deltas(before, after, ["h.0.attn.c_attn"], [1, 3, 8, 12])
    assert list(out) == [1, 3, 8, 12]
    w0 = np.asarray(before["h"]["0"]["attn"]["c_attn"]["kernel"], np.float64)
    dw = np.asarray(after["h"]["0"]["attn"]["c_attn"]["kernel"], np.float64) - w0
    u, s, vt = np.linalg.svd(dw.T)
    for r, params in out.items():
        n = min(r, 8)
        expected = w0 + (u[:, :n] * s[:n] @ vt[:n]).T
        np.testing.assert_allclose(params["h"]["0"]["attn"]["c_attn"]["kernel"], expected, atol=1e-5)
        # every other leaf is the fine-tune's, untouched
        assert params["h"]["0"]["attn"]["c_attn"]["bias"] is after["h"]["0"]["attn"]["c_attn"]["bias"]
        assert params["h"]["0"]["ln_2"]["scale"] is after["h"]["0"]["ln_2"]["scale"]
    np.testing.assert_allclose(
        out[12]["h"]["0"]["attn"]["c_attn"]["kernel"], after["h"]["0"]["attn"]["c_attn"]["kernel"], atol=1e-5
    )


def test_curve_distance():
    a = np.linspace(3.0, 1.0, 50)
    assert curve_distance(a, a + 0.25, window=7) == pytest.approx(0.25)
    noisy = a + 0.1 * np.where(np.arange(50) % 2, 1.0, -1.0)  # alternating noise averages out
    assert curve_distance(a, noisy, window=2) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one length"):
        curve_distance(a, a[:-1])


def test_script_config_layers_quick_under_set():
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    cfg = script_config(parser.parse_args(["--out", "x", "--quick", "--set", "steps=7"]))
    assert cfg.steps == 7 and cfg.optim.total_steps == 7  # --set wins over QUICK's steps=300
    assert cfg.model.random["n_layer"] == 1 and cfg.optim.lr == 1e-2 and "steps=300" in QUICK
    assert script_config(parser.parse_args(["--out", "x"])).model.random["n_layer"] == 4  # the embedded default


def test_take_rows_nests_smaller_sets_in_larger():
    rows = tokenize([Example(f"q{i}", f"a{i}") for i in range(50)], ByteTokenizer(), seq_len=12)
    small, large = take_rows(rows, 10, seed=3), take_rows(rows, 30, seed=3)
    assert len(small) == 10 and len(large) == 30
    assert set(small.example_index) <= set(large.example_index)
    assert list(small.example_index) == sorted(small.example_index)
    i = list(rows.example_index).index(small.example_index[4])
    np.testing.assert_array_equal(small.input_ids[4], rows.input_ids[i])
    np.testing.assert_array_equal(small.loss_mask[4], rows.loss_mask[i])
    with pytest.raises(DataError, match="cannot take 51 rows of a set of 50; valid: 1 .. 50"):
        take_rows(rows, 51, seed=0)


def test_numbers_are_one_line_usage_errors():
    assert numbers("1,2,64", "--ranks") == [1, 2, 64] and numbers("3e-3", "--lr", float) == [0.003]
    for bad in ("1,x", "0,4", "", "-2"):
        with pytest.raises(UsageError, match="--ranks: .* is not a comma-separated list of positive ints"):
            numbers(bad, "--ranks")
    for bad in ("0.1,inf", "nan"):
        with pytest.raises(UsageError, match="--lr: .* is not a comma-separated list of positive, finite floats"):
            numbers(bad, "--lr", float)
