"""Scaling, effective learning rate and the alpha that keeps them: the source document's numbers."""

import math

import pytest

import jlora
from jlora.core.lora.config import LoraConfig


@pytest.mark.parametrize("r", [4, 8, 16, 32])
def test_alpha_twice_r_gives_scaling_two(r):
    assert jlora.scaling(LoraConfig(r=r, alpha=2 * r)) == 2.0


@pytest.mark.parametrize("alpha, expected", [(16, 4e-4), (8, 2e-4), (32, 8e-4)])
def test_effective_lr_of_the_source(alpha, expected):
    assert jlora.effective_lr(2e-4, LoraConfig(r=8, alpha=alpha)) == pytest.approx(expected, rel=1e-12)


def test_rslora_scales_by_sqrt_r():
    cfg = LoraConfig(r=16, alpha=8, rslora=True)
    assert jlora.scaling(cfg) == 2.0  # 8 / sqrt(16)
    assert jlora.effective_lr(1e-3, cfg) == pytest.approx(2e-3, rel=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r_new", [1, 4, 32, 64])
def test_alpha_for_rank_keeps_scaling_and_effective_lr(rslora, r_new):
    cfg = LoraConfig(r=8, alpha=16, rslora=rslora)
    moved = cfg.replace(r=r_new, alpha=jlora.alpha_for_rank(cfg, r_new))
    assert jlora.scaling(moved) == pytest.approx(jlora.scaling(cfg), rel=1e-12)
    assert jlora.effective_lr(2e-4, moved) == pytest.approx(jlora.effective_lr(2e-4, cfg), rel=1e-12)
    assert moved.alpha == pytest.approx(16 * (math.sqrt(r_new / 8) if rslora else r_new / 8), rel=1e-12)


def test_alpha_for_rank_rejects_bad_rank():
    with pytest.raises(ValueError, match="positive integer"):
        jlora.alpha_for_rank(LoraConfig(), 0)


def test_scaling_for_follows_patterns():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"c_proj": 4}, alpha_pattern={"c_fc": 64})
    assert cfg.scaling_for("h.0.attn.c_attn") == 2.0
    assert cfg.scaling_for("h.0.attn.c_proj") == 4.0  # 16 / 4
    assert cfg.scaling_for("h.1.mlp.c_fc") == 8.0  # 64 / 8
