"""Run configs: YAML + overrides, validation with one-line errors naming the key."""

import pytest

from jlora.training.run.config import (
    DEFAULT_CONFIG,
    ConfigError,
    RunConfig,
    from_dict,
    load_run_config,
    save_run_config,
)


def test_shipped_configs_load(tmp_path):
    default = load_run_config()
    assert default == load_run_config("configs/default.yaml")
    assert default.model.name == "random" and default.data.tokenizer == "bytes"
    qa = load_run_config("configs/gpt2_qa.yaml")
    assert (qa.model.name, qa.lora.r, qa.lora.alpha, qa.lora.target_modules) == ("gpt2", 8, 16.0, ("c_attn",))
    assert (qa.optim.lr, qa.seq_len) == (2e-4, 512)
    save_run_config(qa, tmp_path / "c.yaml")
    assert load_run_config(tmp_path / "c.yaml") == qa
    assert DEFAULT_CONFIG.exists()


def test_overrides_are_typed():
    cfg = load_run_config(None, ["optim.lr=1e-3", "lora.r=4", "lora.target_modules=[c_attn, c_fc]", "init_from=null"])
    assert cfg.optim.lr == 1e-3 and cfg.lora.r == 4 and cfg.lora.target_modules == ("c_attn", "c_fc")
    assert cfg.init_from is None
    assert load_run_config(None, ["model.name=/some/dir"]).model.name == "/some/dir"
    qa = load_run_config("configs/gpt2_qa.yaml", ["model=/some/dir", "model.dtype=bfloat16"])
    assert (qa.model.name, qa.model.dtype, qa.seq_len) == ("/some/dir", "bfloat16", 512)
    assert from_dict({"model": "gpt2-medium"}).model.name == "gpt2-medium"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optim": {"learning_rate": 1}}, "unknown key 'optim.learning_rate'; valid: b1, b2, clip_norm"),
        ({"steps": "ten"}, "steps must be int, got 'ten'"),
        ({"batch_size": 2.5}, "batch_size must be int, got 2.5"),
        ({"lora": {"r": -1}}, "lora: LoRA rank r must be a positive integer, got r=-1"),
        ({"lora": {"target_modules": ["q_proj"]}}, "unknown LoRA target 'q_proj'"),
        ({"seq_len": 4096, "model": {"random": {"n_positions": 128}}}, "seq_len=4096 is longer than the model's"),
        ({"data": {"train": "missing.jsonl"}}, "data.train: no such file missing.jsonl"),
        ({"optim": {"grad_accum": 3}, "batch_size": 8}, "batch_size=8 is not divisible by optim.grad_accum=3"),
        ({"model": 3}, "model must be a mapping, got 3"),
        ({"model": {"dtype": "fp8"}}, "model.dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
        ({"data": {"buckets": 0}}, "data.buckets must be a positive length step, 'octaves', 'pow2' or 'none', got 0"),
    ],
)
def test_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as info:
        from_dict(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_run_config(None, ["steps"])


def test_round_trip_to_dict():
    cfg = RunConfig()
    assert from_dict(cfg.to_dict()) == cfg


def test_dtype_auto_is_float32_on_a_cpu_and_bfloat16_on_accelerators(monkeypatch):
    model = from_dict({}).model
    assert model.dtype == "auto" and model.param_dtype == "float32"
    assert [model.compute_dtype(b) for b in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
    assert from_dict({"model": {"dtype": "float32"}}).model.compute_dtype("gpu") == "float32"
    # the run builds its model with the dtype of the machine it runs on
    import jax

    from jlora.training.run.build import build_base

    cfg = from_dict({"model": {"random": {"n_layer": 1, "n_embd": 16, "n_head": 2}}})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model, params = build_base(cfg, vocab_size=11)
    assert model.config.dtype == "bfloat16" and {x.dtype.name for x in jax.tree.leaves(params)} == {"float32"}


def test_population_members_from_a_grid_and_a_list():
    from jlora.training.run.config import from_dict, population_members

    cfg = from_dict(
        {
            "lora": {"r": 8, "alpha": 16},
            "optim": {"lr": 1e-3},
            "seed": 5,
            "adapter_seed": 7,
            "population": {"grid": {"r": [4, 8], "alpha": ["2r", 16], "lr": ["3e-3"]}},
        }
    )
    members = population_members(cfg)
    assert [(m.lora.r, m.lora.alpha, m.lr, m.seed) for m in members] == [
        (4, 8.0, 3e-3, 7),
        (4, 16.0, 3e-3, 7),
        (8, 16.0, 3e-3, 7),  # r=8: alpha 2r and 16 are one member
    ]
    assert [m.name for m in members] == ["r=4,alpha=8,lr=0.003", "r=4,alpha=16,lr=0.003", "r=8,alpha=16,lr=0.003"]
    cfg = from_dict(
        {"population": {"members": [{"r": 2, "alpha": "0.5r", "rslora": True}, {"seed": 3, "loraplus_ratio": 16}]}}
    )
    first, second = population_members(cfg)
    assert (first.lora.r, first.lora.alpha, first.lora.rslora, first.seed) == (2, 1.0, True, 0)
    assert (second.lora, second.loraplus_ratio, second.seed) == (cfg.lora, 16.0, 3)
    assert from_dict(cfg.to_dict()) == cfg  # the section survives config.yaml
