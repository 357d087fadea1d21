"""The fault catalogue: what a user can get wrong, driven through `jlora` and the API as a user would.

Each command case builds its inputs in its own folder, hashes every file and folder it can see
(its own, the shared model, run and adapter folders), runs one command, and asserts the exit
status, that stderr is one line holding the expected words, and that the hashes are unchanged:
a failed command changes nothing on disk (no file changed, none added, none removed).
The cases that need processes (a second `jlora train`, Ctrl-C, SIGKILL in a save) run them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.cli import main
from jlora.errors import CheckpointError, ConfigError, DataError
from jlora.training.records.metrics import read_metrics

MODEL = "model.random={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, embd_pdrop: 0.0, resid_pdrop: 0.0}"


def qa_rows(n: int, question: str = "q{i}") -> str:
    return "".join(json.dumps({"question": question.format(i=i), "answer": f"a{i % 3}"}) + "\n" for i in range(n))


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_hf, population_run):
    """Folders many cases read: data, a finished run (checkpoints 1 and 2), the same run on another random base
    (another seed), a PEFT adapter, a model, a population run (members 0..2)."""
    root = tmp_path_factory.mktemp("shared")
    (root / "train.jsonl").write_text(qa_rows(24))
    args = ["train", *tiny(root), "--set", "steps=2", "--set", "checkpoint.every=1", "--out", str(root / "run")]
    assert main(args) == 0
    assert main(["train", *tiny(root), "--set", "steps=1", "--set", "seed=1", "--out", str(root / "run2")]) == 0
    model, params, lora, lora_cfg, _ = jlora.load_run(root / "run")
    jlora.save_peft(root / "peft", lora, lora_cfg, base_model_name_or_path=None)
    return {
        "root": root,
        "run": root / "run",
        "run2": root / "run2",
        "peft": root / "peft",
        "model": Path(tiny_hf[0]),
        "pop": Path(population_run),
    }


def tiny(root: Path) -> list[str]:
    """--set arguments of a 1-layer, 32-wide random GPT-2 on a 24-row data file: a run of seconds."""
    values = [MODEL, "seq_len=64", "batch_size=8", "exact_match=0", "eval_every=1000", "log_every=1"]
    values += [f"data.train={root / 'train.jsonl'}", "data.validation=null", "data.tokenizer=bytes"]
    values += ["eval.forgetting=null"]
    return [arg for value in values for arg in ("--set", value)]


def snapshot(*roots: Path) -> dict[str, str | None]:
    """{path: sha256 of a file, None for a folder} of everything under `roots`."""
    found: dict[str, str | None] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return found


def copy_model(shared: dict, to: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(shared["model"], to)
    change(to)
    return to


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def reshape_ln_f(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"][:-1]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def as_pickle(folder: Path) -> None:
    import torch
    from safetensors.numpy import load_file

    state = load_file(folder / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def set_json(file: Path, **changes) -> None:
    values = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    file.write_text(json.dumps(values))


@dataclasses.dataclass(frozen=True)
class Case:
    """`jlora ARGS` (placeholders: {tmp} the case's folder, {run} {peft} {model} {root} the shared ones;
    "TINY" expands to the tiny run's --set arguments), after `setup(tmp, shared)`."""

    args: str | list[str]
    status: int
    message: str
    setup: Callable[[Path, dict], None] | None = None


def peft_copy(change: Callable[[dict, dict], None]) -> Callable[[Path, dict], None]:
    """A setup: the shared PEFT folder copied to {tmp}/p, `change(tensors, metadata)` made to its safetensors."""

    def setup(tmp: Path, shared: dict) -> None:
        from safetensors import safe_open
        from safetensors.numpy import save_file

        shutil.copytree(shared["peft"], tmp / "p")
        file = tmp / "p" / "adapter_model.safetensors"
        with safe_open(file, "np") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        change(tensors, metadata)
        save_file(tensors, file, metadata=metadata)

    return setup


def poison(tensors: dict, metadata: dict) -> None:
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan


def damage_metadata(tensors: dict, metadata: dict) -> None:
    metadata["jlora_lora_config"] = metadata["jlora_lora_config"][:-9]  # cut short: no longer JSON


def wider_model(tmp: Path, shared: dict) -> None:
    """{tmp}/m48: a GPT-2 like the shared model but 48 wide, which the shared adapters (32 wide) do not fit."""
    config = jlora.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    jlora.save_gpt2(tmp / "m48", config, jlora.init_params(jax.random.key(0), config))


def write(name: str, content: str | bytes) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, shared: dict) -> None:
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


T = "train TINY --set steps=2 --out {tmp}/out"
P = " --set 'population={grid: {r: [1, 2]}}'"
CASES = {
    # run configs: the file, every kind of bad value, --set syntax
    "config_path_is_a_directory": Case("train {tmp} --out {tmp}/out", 2, "is a directory, not a config file"),
    "config_file_missing": Case("train {tmp}/none.yaml --out {tmp}/out", 2, "no such config file"),
    "config_not_yaml": Case("train {tmp}/c.yaml --out {tmp}/out", 2, "not valid YAML", write("c.yaml", "steps: [1,")),
    "config_yaml_error_names_line_and_column": Case(
        "train {tmp}/c.yaml --out {tmp}/out",
        2,
        "c.yaml, line 4, column 9: not valid YAML (mapping values are not allowed here)",
        write("c.yaml", "steps: 10\nlora:\n  r: 4\n   alpha: 8\n"),  # alpha indented one too many
    ),
    "config_not_a_mapping": Case(
        "train {tmp}/c.yaml", 2, "expected a mapping at the top level", write("c.yaml", "- 1")
    ),
    "config_not_utf8": Case(
        "train {tmp}/c.yaml --out {tmp}/out", 2, "cannot read config file", write("c.yaml", b"\xff")
    ),
    "unknown_key": Case(T + " --set lr=1e-3", 2, "unknown key 'lr'; valid: adalora, adapter_seed, batch_size"),
    "unknown_nested_key": Case(T + " --set lora.rank=4", 2, "unknown key 'lora.rank'; valid: alpha"),
    "int_given_text": Case(T + " --set steps=ten", 2, "steps must be int, got 'ten'"),
    "int_given_float": Case(T + " --set lora.r=2.5", 2, "lora.r must be int, got 2.5"),
    "bool_given_text": Case(T + " --set lora.rslora=maybe", 2, "lora.rslora must be bool, got 'maybe'"),
    "float_given_text": Case(T + " --set lora.alpha=abc", 2, "lora.alpha must be float, got 'abc'"),
    "list_given_number": Case(T + " --set trainable.modules_to_save=5", 2, "must be a list, got 5"),
    "section_given_number": Case(T + " --set optim=3", 2, "optim must be a mapping, got 3"),
    "steps_zero": Case(T + " --set steps=0", 2, "steps must be > 0, got 0"),
    "batch_size_negative": Case(T + " --set batch_size=-8", 2, "batch_size must be > 0, got -8"),
    "dropout_out_of_range": Case(T + " --set lora.dropout=1.5", 2, "LoRA dropout must be in [0, 1), got dropout=1.5"),
    "lr_infinite": Case(T + " --set optim.lr=.inf", 2, "lr must be a finite number, got inf"),
    "lr_negative": Case(T + " --set optim.lr=-1e-3", 2, "lr must be > 0, got -0.001"),
    "schedule_unknown": Case(T + " --set optim.schedule=step", 2, "unknown schedule 'step'; valid: cosine"),
    "total_steps_set": Case(T + " --set optim.total_steps=5", 2, "optim.total_steps is set by the run's `steps`"),
    "eval_batches_zero": Case(T + " --set eval_batches=0", 2, "eval_batches must be > 0 or null"),
    "max_to_keep_zero": Case(T + " --set checkpoint.max_to_keep=0", 2, "checkpoint.max_to_keep must be > 0 or null"),
    "exact_match_negative": Case(T + " --set exact_match=-1", 2, "exact_match must be >= 0 (0: off), got -1"),
    "grad_accum_not_dividing": Case(T + " --set optim.grad_accum=3", 2, "batch_size=8 is not divisible by optim"),
    "seq_len_over_positions": Case(
        T + " --set seq_len=100", 2, "seq_len=100 is longer than the model's n_positions=64"
    ),
    "random_model_unknown_key": Case(T + " --set 'model.random={n_lay: 1}'", 2, "unknown key 'model.random.n_lay'"),
    "random_model_bad_shape": Case(
        T + " --set 'model.random={n_embd: 30, n_head: 4}'", 2, "n_embd=30 is not divisible by n_head=4"
    ),
    "model_dtype_unknown": Case(T + " --set model.dtype=int8", 2, "model.dtype must be one of auto, float32, bfloat16"),
    "set_without_equals": Case(T + " --set steps", 2, "--set expects key=value"),
    "set_value_not_yaml": Case(
        T + " --set 'steps=[1,'", 2, "--set 'steps=[1,': the value is not valid YAML, line 1, column 4"
    ),
    "set_key_with_empty_part": Case(T + " --set lora..r=4", 2, "--set expects key=value"),
    "lora_target_unknown": Case(T + " --set lora.target_modules=[q_proj]", 2, "unknown LoRA target 'q_proj'"),
    "lora_layers_out_of_range": Case(T + " --set lora.layers=[5]", 2, "LoRA layers [5] out of range; valid: 0..0"),
    "lora_rank_above_width": Case(T + " --set lora.r=64", 2, "r=64 exceeds h.0.attn.c_attn's width (32 -> 96)"),
    "modules_to_save_unknown": Case(
        T + " --set trainable.modules_to_save=[bogus]", 2, "modules_to_save: no base module named 'bogus'"
    ),
    "trainable_bias_unknown": Case(T + " --set trainable.bias=some", 2, "trainable.bias must be none, all or"),
    # a search: successive halving over a population
    "search_without_population": Case(
        T + " --set 'search={eta: 2}'", 2, "search: successive halving prunes a population"
    ),
    "search_eta_below_2": Case(T + P + " --set 'search={eta: 1, rung_every: 1}'", 2, "search.eta must be >= 2"),
    "search_rung_every_zero": Case(T + P + " --set 'search={rung_every: 0}'", 2, "search.rung_every must be in 1..1"),
    "search_rung_every_at_steps": Case(
        T + P + " --set 'search={rung_every: 2}'", 2, "search.rung_every must be in 1..1"
    ),
    "search_metric_unknown": Case(
        T + P + " --set 'search={rung_every: 1, metric: accuracy}'", 2, "search.metric must be one of val_loss"
    ),
    "search_without_validation": Case(
        T + P + " --set 'search={rung_every: 1}'", 2, "search.metric=val_loss needs a validation set"
    ),
    "search_exact_match_off": Case(
        T + P + " --set data.validation=bundled --set 'search={rung_every: 1, metric: exact_match}'",
        2,
        "search.metric=exact_match needs exact_match > 0",
    ),
    "train_until_past_steps": Case(T + " --until 3", 2, "until=3 must be in 1..2"),
    # data files
    "data_file_missing": Case(T + " --set data.train={tmp}/none.jsonl", 2, "no such file"),
    "data_file_empty": Case(T + " --set data.train={tmp}/d.jsonl", 2, "d.jsonl: no examples", write("d.jsonl", "")),
    "data_line_malformed": Case(
        T + " --set data.train={tmp}/d.jsonl",
        2,
        "d.jsonl, line 2: invalid JSON",
        write("d.jsonl", '{"question": "a", "answer": "b"}\n{"question": "a", "answer"\n'),
    ),
    "data_field_missing": Case(
        T + " --set data.train={tmp}/d.jsonl --set data.format=qa",
        2,
        "d.jsonl, line 1: missing key 'answer'",
        write("d.jsonl", '{"question": "a"}\n'),
    ),
    "data_field_not_text": Case(
        T + " --set data.train={tmp}/d.jsonl",
        2,
        "line 1: 'question' must be a string, got int",
        write("d.jsonl", '{"question": 5, "answer": "a"}\n'),
    ),
    "data_not_utf8": Case(
        T + " --set data.train={tmp}/d.jsonl",
        2,
        "d.jsonl, line 1: not UTF-8 text",
        write("d.jsonl", b'{"question": "\xff", "answer": "b"}\n'),
    ),
    "data_records_longer_than_seq_len": Case(
        T + " --set data.train={tmp}/d.jsonl",
        2,
        "none of the 9 examples fits seq_len=64",
        write("d.jsonl", qa_rows(9, question="x" * 80)),
    ),
    "data_fewer_rows_than_a_batch": Case(
        T + " --set data.train={tmp}/d.jsonl",
        2,
        "batch_size=8 is larger than the 3 training examples",
        write("d.jsonl", qa_rows(3)),
    ),
    "data_format_unknown": Case(T + " --set data.format=csv", 2, "unknown data format 'csv'"),
    "validation_line_malformed": Case(
        T + " --set data.validation={tmp}/v.jsonl", 2, "v.jsonl, line 1: invalid JSON", write("v.jsonl", "{\n")
    ),
    "tokenizer_folder_missing": Case(T + " --set data.tokenizer={tmp}/none", 2, "no tokenizer directory"),
    # model folders
    "model_folder_missing": Case(T + " --set model={tmp}/none", 2, "no checkpoint directory at"),
    "model_without_weights": Case(
        T + " --set model={tmp}/m",
        2,
        "no model.safetensors, model.safetensors.index.json or pytorch_model.bin",
        lambda tmp, s: copy_model(s, tmp / "m", lambda m: (m / "model.safetensors").unlink()),
    ),
    "model_safetensors_truncated": Case(
        T + " --set model={tmp}/m",
        2,
        "model.safetensors (SafetensorError",
        lambda tmp, s: copy_model(s, tmp / "m", lambda m: truncate(m / "model.safetensors")),
    ),
    "model_tensor_wrong_shape": Case(
        T + " --set model={tmp}/m",
        2,
        "tensor transformer.ln_f.weight has shape (31,), the config expects (32,)",
        lambda tmp, s: copy_model(s, tmp / "m", reshape_ln_f),
    ),
    "model_pickle_without_opt_in": Case(
        T + " --set model={tmp}/m",
        2,
        "pytorch_model.bin is a pickle",
        lambda tmp, s: copy_model(s, tmp / "m", as_pickle),
    ),
    "model_config_json_corrupt": Case(
        T + " --set model={tmp}/m",
        2,
        "config.json is not valid JSON",
        lambda tmp, s: copy_model(s, tmp / "m", lambda m: truncate(m / "config.json")),
    ),
    "model_config_json_wrong_type": Case(
        T + " --set model={tmp}/m",
        2,
        "config.json: GPT2Config.n_head must be int, got 'four'",
        lambda tmp, s: copy_model(s, tmp / "m", lambda m: set_json(m / "config.json", n_head="four")),
    ),
    # init_from: a PEFT adapter folder to start from
    "init_from_missing": Case(T + " --set init_from={tmp}/none", 2, "init_from: no such adapter folder"),
    "init_from_config_not_json": Case(
        T + " --set init_from={tmp}/p",
        2,
        "adapter_config.json is not valid JSON",
        lambda tmp, s: (shutil.copytree(s["peft"], tmp / "p"), truncate(tmp / "p" / "adapter_config.json")),
    ),
    "init_from_config_without_r": Case(
        T + " --set init_from={tmp}/p",
        2,
        "adapter_config.json lacks 'r', which a LoRA adapter needs",
        lambda tmp, s: (shutil.copytree(s["peft"], tmp / "p"), set_json(tmp / "p" / "adapter_config.json", r=None)),
    ),
    "init_from_config_without_lora_alpha": Case(
        T + " --set init_from={tmp}/p",
        2,
        "adapter_config.json lacks 'lora_alpha'",
        lambda tmp, s: (
            shutil.copytree(s["peft"], tmp / "p"),
            set_json(tmp / "p" / "adapter_config.json", lora_alpha=None),
        ),
    ),
    "init_from_weights_truncated": Case(
        T + " --set init_from={tmp}/p",
        2,
        "adapter_model.safetensors (SafetensorError",
        lambda tmp, s: (shutil.copytree(s["peft"], tmp / "p"), truncate(tmp / "p" / "adapter_model.safetensors")),
    ),
    # run directories
    "out_is_a_file": Case("train TINY --out {tmp}/f", 2, "is a file, not a directory", write("f", "x")),
    "out_under_a_file": Case("train TINY --out {tmp}/f/run", 2, "lies under", write("f", "x")),
    "resume_with_a_changed_config": Case(
        "train TINY --set steps=2 --set checkpoint.every=1 --set lora.alpha=8 --set optim.lr=1e-3 --out {run}",
        2,
        "holds a run with lora.alpha=16.0, not 8.0 (and 1 more); use another --out",
    ),
    # export, generate, diagnose
    "export_to_a_non_empty_folder": Case(
        "export {run} --peft {tmp}/o", 2, "exists and is not empty", write("o/keep", "x")
    ),
    "export_to_a_file": Case("export {run} --merged {tmp}/f", 2, "is a file; choose a new folder", write("f", "x")),
    "export_under_a_file": Case(
        "export {run} --peft {tmp}/f/o", 2, "f is a file; choose another folder", write("f", "x")
    ),
    "export_without_a_checkpoint": Case("export {tmp} --peft {tmp}/o", 2, "no adapter checkpoint in"),
    "export_missing_step": Case("export {run} --peft {tmp}/o --step 7", 2, "no adapter checkpoint at step 7"),
    "generate_peft_config_not_json": Case(
        "generate {tmp}/p --prompt hi --base {model}",
        2,
        "adapter_config.json is not valid JSON",
        lambda tmp, s: (shutil.copytree(s["peft"], tmp / "p"), truncate(tmp / "p" / "adapter_config.json")),
    ),
    "generate_prompts_file_missing": Case("generate {run} --prompts {tmp}/none.txt", 2, "--prompts: no such file"),
    "generate_without_a_prompt": Case("generate {run}", 2, "give --prompt TEXT or --prompts FILE"),
    "diagnose_not_a_run": Case("diagnose {tmp}", 2, "no adapter checkpoint in"),
    "export_best_of_a_run_without_search": Case(
        "export {run} --peft {tmp}/o --member best", 2, "--member best: the run is not a search"
    ),
    # prompts files
    "generate_prompts_file_not_utf8": Case(
        "generate {run} --prompts {tmp}/p.txt",
        2,
        "p.txt, line 2: not UTF-8 text (byte 0xff)",
        write("p.txt", b"hi\n\xff\n"),
    ),
    "generate_prompts_file_is_a_folder": Case(
        "generate {run} --prompts {tmp}", 2, "is a folder; give a text file of prompts"
    ),
    "generate_prompts_file_empty": Case(
        "generate {run} --prompts {tmp}/p.txt",
        2,
        "p.txt holds no prompt (it is empty or blank)",
        write("p.txt", "\n \n"),
    ),
    # decoding options: finite and in range, checked once (jlora.core.decoding.generate.check_decoding)
    "generate_temperature_nan": Case(
        "generate {run} --prompt hi --temperature nan", 2, "--temperature must be a finite number >= 0, got nan"
    ),
    "generate_temperature_infinite": Case(
        "generate {run} --prompt hi --temperature inf", 2, "--temperature must be a finite number >= 0, got inf"
    ),
    "generate_top_p_nan": Case(
        "generate {run} --prompt hi --temperature 1 --top-p nan", 2, "--top-p must be a finite number in (0, 1]"
    ),
    "generate_top_k_zero": Case("generate {run} --prompt hi --top-k 0", 2, "--top-k must be an integer >= 1, got 0"),
    "generate_max_new_tokens_zero": Case(
        "generate {run} --prompt hi --max-new-tokens 0", 2, "--max-new-tokens must be an integer >= 1, got 0"
    ),
    "generate_repetition_penalty_infinite": Case(
        "generate {run} --prompt hi --repetition-penalty inf", 2, "--repetition-penalty must be a finite number > 0"
    ),
    "generate_beams_beyond_the_vocabulary": Case(
        "generate {run} --prompt hi --num-beams 200", 2, "--num-beams 200: beam search keeps 2 x num_beams candidates"
    ),
    "evaluate_length_penalty_nan": Case(
        "evaluate {run} --data {tmp}/t.txt --length-penalty nan",
        2,
        "--length-penalty must be a finite number, got nan",
        write("t.txt", "name[A]||A.\n"),
    ),
    # output paths: checked at start-up, not after the work
    "diagnose_out_is_a_file": Case("diagnose {run} --out {tmp}/f", 2, "f is a file; choose a folder", write("f", "x")),
    "diagnose_out_under_a_file": Case(
        "diagnose {run} --out {tmp}/f/d", 2, "f is a file; choose another folder", write("f", "x")
    ),
    "evaluate_out_is_a_file": Case(
        "evaluate {run} --data {tmp}/t.txt --out {tmp}/f",
        2,
        "f is a file; choose a folder",
        lambda tmp, s: (write("t.txt", "name[A]||A.\n")(tmp, s), write("f", "x")(tmp, s)),
    ),
    "combine_out_under_a_file": Case(
        "combine {run} {run} --weights 1 1 --method linear --out {tmp}/f/o", 2, "f is a file", write("f", "x")
    ),
    # adapters: damaged metadata, non-finite values, another base
    "generate_peft_metadata_damaged": Case(
        "generate {tmp}/p --prompt hi --base {model}",
        2,
        "adapter_model.safetensors: its 'jlora_lora_config' metadata is damaged",
        peft_copy(damage_metadata),
    ),
    "init_from_metadata_damaged": Case(
        T + " --set init_from={tmp}/p", 2, "'jlora_lora_config' metadata is damaged", peft_copy(damage_metadata)
    ),
    "generate_non_finite_adapter": Case(
        "generate {tmp}/p --prompt hi --base {model}", 2, "p holds non-finite values", peft_copy(poison)
    ),
    "side_by_side_non_finite_adapter": Case(
        "generate --adapter {peft} --adapter {tmp}/p --base {model} --prompt hi",
        2,
        "p holds non-finite values (h.0.attn.c_attn",
        peft_copy(poison),
    ),
    "combine_non_finite_adapter": Case(
        "combine {peft} {tmp}/p --weights 1 1 --method linear --base {model} --out {tmp}/o",
        2,
        "p holds non-finite values",
        peft_copy(poison),
    ),
    "init_from_non_finite_adapter": Case(
        T + " --set init_from={tmp}/p", 2, "init_from {tmp}/p holds non-finite values", peft_copy(poison)
    ),
    "combine_different_random_bases": Case(
        "combine {run} {run2} --weights 1 1 --method linear --out {tmp}/o", 2, "the adapters are on different bases"
    ),
    "side_by_side_different_random_bases": Case(
        "generate --adapter {run} --adapter {run2} --prompt hi", 2, "the adapters are on different bases"
    ),
    "combine_peft_onto_a_wider_base": Case(
        "combine {peft} {peft} --weights 1 1 --method linear --base {tmp}/m48 --out {tmp}/o",
        2,
        "does not fit the base",
        wider_model,
    ),
    "generate_peft_on_a_wider_base": Case(
        "generate {peft} --base {tmp}/m48 --prompt hi", 2, "does not fit the base", wider_model
    ),
    "population_member_lr_infinite": Case(
        T + " --set 'population={grid: {lr: [.inf, 1e-3]}}'", 2, "lr must be a finite number > 0, got inf"
    ),
    "resume_with_fewer_steps": Case(
        "train TINY --set steps=1 --set checkpoint.every=1 --out {run}", 2, "has trained 2 steps already"
    ),
    # --member: the value given, named
    "member_out_of_range": Case(
        "export {pop} --peft {tmp}/o --member 9", 2, "--member 9 is not a member: the checkpoint holds a population"
    ),
    "member_negative_in_a_list": Case("generate {pop} --prompt hi --member 0,-1", 2, "--member -1 is not a member"),
    "member_beside_adapters_of_no_population": Case(
        "generate --adapter {run} --adapter {run} --member 1 --prompt hi",
        2,
        "--member 1: none of {run}, {run} is a population run",
    ),
    "combine_member_of_no_population": Case(
        "combine {run} {run} --member 0,1 --weights 1 1 --method linear --out {tmp}/o",
        2,
        "--member 0,1: none of",
    ),
}


def expand(args: str, tmp: Path, shared: dict) -> list[str]:
    out = []
    for word in shlex.split(args):
        if word == "TINY":
            out += tiny(shared["root"])
        else:
            out.append(placed(word, tmp, shared))
    return out


def placed(text: str, tmp: Path, shared: dict) -> str:
    for key, folder in {"tmp": tmp, **shared}.items():
        text = text.replace("{" + key + "}", str(folder))
    return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_command_fault(name, shared, tmp_path, capsys):
    case = CASES[name]
    if case.setup is not None:
        case.setup(tmp_path, shared)
    capsys.readouterr()
    roots = (tmp_path, shared["root"], shared["model"], shared["pop"])
    before = snapshot(*roots)
    status = main(expand(case.args, tmp_path, shared))
    err = capsys.readouterr().err
    assert status == case.status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and placed(case.message, tmp_path, shared) in lines[0], err
    assert "Traceback" not in err
    assert snapshot(*roots) == before


def config_fields(cls: type = None, prefix: str = "") -> dict[str, object]:
    """{dotted key: default} of every leaf field of RunConfig (optim.total_steps is the run's steps)."""
    from jlora.training.run.config import RunConfig

    cls = cls or RunConfig
    fields = {}
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            fields.update(config_fields(type(default), f"{prefix}{f.name}."))
        elif f"{prefix}{f.name}" != "optim.total_steps":
            fields[f"{prefix}{f.name}"] = default
    return fields


def wrong_value(key: str, default: object) -> str:
    """A YAML value of the wrong type for a field with this default: a mapping for a list or an optional, and so on."""
    if key in ("population", "search", "adalora"):  # an optional section: a mapping would be read as one
        return "[1, 2]"
    if default is None or isinstance(default, tuple | list):
        return "{x: 1}"
    return "[1]" if isinstance(default, dict) else "[1, 2]"


@pytest.mark.parametrize("key", sorted(config_fields()))
def test_every_config_field_refuses_a_wrong_type(key):
    from jlora.errors import ConfigError
    from jlora.training.run.config import load_run_config

    with pytest.raises(ConfigError, match=f"^{re.escape(key)} must be ") as raised:
        load_run_config(overrides=[f"{key}={wrong_value(key, config_fields()[key])}"])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("section", ["model", "data", "lora", "trainable", "optim", "checkpoint"])
def test_every_config_section_refuses_an_unknown_key(section, tmp_path, capsys):
    assert main(["train", "--set", f"{section}.bogus=1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: unknown key '{section}.bogus'; valid: " in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "call", "error", "message"),
    [
        ("lora_config_alpha_text", lambda: jlora.LoraConfig(alpha="16"), ConfigError, "alpha must be a number"),
        ("lora_config_r_float", lambda: jlora.LoraConfig(r=8.0), ConfigError, "r must be an integer, got r=8.0"),
        ("lora_config_layers_text", lambda: jlora.LoraConfig(layers=["0"]), ConfigError, "layers must be None or"),
        ("optim_config_lr_infinite", lambda: jlora.OptimConfig(lr=float("inf")), ConfigError, "lr must be a finite"),
        ("gpt2_config_n_head_text", lambda: jlora.GPT2Config(n_head="12"), ConfigError, "n_head must be int"),
        ("load_peft_config_without_r", None, CheckpointError, "lacks 'r'"),
    ],
)
def test_api_fault(name, call, error, message, shared, tmp_path):
    if call is None:  # the API under the `init_from_config_without_r` command case
        shutil.copytree(shared["peft"], tmp_path / "p")
        set_json(tmp_path / "p" / "adapter_config.json", r=None)
        call = lambda: jlora.load_peft(tmp_path / "p")  # noqa: E731
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        call()
    assert len(str(raised.value).splitlines()) == 1


def test_token_ids_outside_the_vocabulary(shared):
    """Outside jit: a DataError naming the id. Inside jit (no error possible): NaN logits for the row, as documented."""
    config = jlora.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model, params = jlora.GPT2(config), jlora.init_params(jax.random.key(0), config)
    for bad in (11, -1):
        with pytest.raises(DataError, match=rf"token id {bad} is outside the model's vocabulary 0\.\.10"):
            model.apply({"params": params}, jnp.array([[1, 2, bad]]))
    apply = jax.jit(lambda ids: model.apply({"params": params}, ids))
    logits = np.asarray(apply(jnp.array([[1, 2, 3], [1, 2, 11]])))
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()
    with pytest.raises(DataError, match="token id 11"):  # generate's loop is jitted: it checks first
        jlora.generate(model, params, [[1, 11]], max_new_tokens=2)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only: a read-only bind mount for root (whom permissions do not stop), else chmod."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], capture_output=True).returncode:
        pytest.skip("running as root and cannot bind-mount a read-only folder")
    try:
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def test_read_only_run_dir(shared, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    with read_only(run):
        status = main(["train", *tiny(shared["root"]), "--set", "steps=2", "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and f"{run} is not writable" in err, err
    assert snapshot(tmp_path) == before


def corrupt(checkpoint: Path) -> Path:
    """Truncate every data file of a checkpoint's adapter (as a full disk or a partial copy would).

    Every one: OCDBT may leave data files that no longer hold a live value, and one truncated alone
    may not be read at all."""
    for f in (checkpoint / "adapter").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            truncate(f)
    return checkpoint


def test_damaged_newest_checkpoint(shared, tmp_path, capsys):
    """Resume falls back to the newest intact checkpoint and sets the damaged one aside, unchanged;
    export names it; with no intact checkpoint left, train stops with one line and moves nothing."""
    run = tmp_path / "run"
    shutil.copytree(shared["run"], run)
    damaged = corrupt(run / "checkpoints" / "2")
    files = {str(p.relative_to(damaged)): p.read_bytes() for p in damaged.rglob("*") if p.is_file()}
    before = snapshot(tmp_path)

    assert main(["export", str(run), "--peft", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot read the checkpoint in {damaged} (ValueError" in err
    assert snapshot(tmp_path) == before

    args = ["train", *tiny(shared["root"]), "--set", "steps=3", "--set", "checkpoint.every=1", "--out", str(run)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    aside = run / "checkpoints-unreadable" / "2"
    assert "jlora: checkpoint 2 cannot be read (" in err and f"moved to {aside}" in err
    assert "resuming at step 1" in out
    assert {str(p.relative_to(aside)): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == files
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    reference = {r["step"]: r["loss"] for r in read_metrics(shared["run"]) if "loss" in r}
    assert {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r and r["step"] <= 2} == reference

    for checkpoint in (run / "checkpoints").iterdir():  # every checkpoint damaged: nothing to resume from
        corrupt(checkpoint)
    before = snapshot(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint in" in err and "can be read; the newest, step 3, fails" in err
    assert snapshot(tmp_path) == before


# Processes: a second `jlora train` on a folder in use, Ctrl-C, SIGKILL inside a checkpoint save.
# A constant learning rate makes every update independent of `steps`, so a run interrupted on
# its way to 100000 steps and finished with steps=12 must equal the 12-step reference exactly.

KILL_AT_COMMIT = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *args, **kwargs):  # every file of the step is written; the rename would commit it
    if self.get_final().name == os.environ["JLORA_TEST_KILL_AT"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from jlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


KILL_AT_8 = {"JLORA_TEST_KILL_AT": "8"}

# `jlora train` as a terminal's foreground job has it: SIGINT not ignored, whatever this suite inherited (a
# suite started in the background by a script has SIGINT ignored, and so would the run, which then keeps it so).
CTRL_C = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from jlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def jlora_train(args: list[str], *, script: str | None = None, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", script, "train"] if script else [sys.executable, "-m", "jlora.cli", "train"]
    return subprocess.Popen(
        [*command, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(run: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len({r["step"] for r in rows}) == len(rows), "a step recorded twice"
    return {r["step"]: r["loss"] for r in rows}


def test_in_use_interrupted_and_killed_runs(shared, tmp_path, capsys):
    """A second train on a folder in use is refused (files untouched); Ctrl-C stops after a checkpoint
    at the step reached, in one line; SIGKILL at a checkpoint's commit leaves the previous checkpoint.
    Both resume to the uninterrupted run's losses, bit for bit."""
    common = [*tiny(shared["root"]), "--set", "optim.schedule=constant", "--set", "checkpoint.max_to_keep=null"]
    steps = lambda n, every: ["--set", f"steps={n}", "--set", f"checkpoint.every={every}"]  # noqa: E731
    reference = jlora_train([*common, *steps(40, 4), "--out", str(tmp_path / "ref")])
    interrupted = jlora_train([*common, *steps(100000, 1000), "--out", str(tmp_path / "int")], script=CTRL_C)
    kill = jlora_train([*common, *steps(12, 4), "--out", str(tmp_path / "kill")], script=KILL_AT_COMMIT, env=KILL_AT_8)

    while not (tmp_path / "int" / "metrics.jsonl").exists() or not losses(tmp_path / "int"):  # it is training
        assert interrupted.poll() is None, interrupted.communicate()
    interrupted.send_signal(signal.SIGSTOP)  # hold it at an early step, with the folder locked
    marker = tmp_path / "int" / "notes.txt"
    marker.write_text("the user's notes")
    before = snapshot(tmp_path / "int")
    assert main(["train", *common, *steps(100000, 1000), "--out", str(tmp_path / "int")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is in use by another `jlora train`" in err
    assert snapshot(tmp_path / "int") == before

    interrupted.send_signal(signal.SIGINT)
    interrupted.send_signal(signal.SIGCONT)
    out, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("jlora train: interrupted at step ") and line.endswith("the same command resumes it")
    stopped = int(line.split(" at step ")[1].split(";")[0])
    assert 1 <= stopped < 40 and (tmp_path / "int" / "checkpoints" / str(stopped) / "meta").exists()
    assert max(losses(tmp_path / "int")) == stopped

    kill.communicate(timeout=300)
    assert kill.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "kill" / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]

    # The same commands again finish both runs (the long one told to stop at 40, like the reference).
    assert main(["train", *common, *steps(40, 1000), "--out", str(tmp_path / "int")]) == 0
    assert f"resuming at step {stopped}" in capsys.readouterr().out
    assert main(["train", *common, *steps(12, 4), "--out", str(tmp_path / "kill")]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]
    expected = losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 41))
    assert losses(tmp_path / "int") == expected
    assert losses(tmp_path / "kill") == {s: v for s, v in expected.items() if s <= 12}


def test_research_script_bad_config(tmp_path):
    """The research scripts answer a bad config as `jlora` does: one line on stderr, exit status 2."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "rank_sweep.py"
    args = [sys.executable, str(script), "--quick", "--set", "lora.layers=[5]", "--out", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["rank_sweep.py: error: LoRA layers [5] out of range; valid: 0..0"]
    assert list(tmp_path.iterdir()) == []


# The research scripts' own options: zero, infinite or NaN is refused before any work, as a command's are.
SCRIPT_CASES = {
    "rank_sweep_fixed_alpha_zero": (
        "rank_sweep",
        "--fixed-alpha 0",
        "--fixed-alpha must be a finite number > 0, got 0.0",
    ),
    "data_size_sweep_scale_infinite": (
        "data_size_sweep",
        "--scale inf",
        "--scale must be a finite number > 0, got inf",
    ),
    "data_size_sweep_val_rows_zero": ("data_size_sweep", "--val-rows 0", "--val-rows must be an integer >= 1, got 0"),
    "planted_rank_steps_zero": ("planted_rank", "--steps 0", "--steps must be an integer >= 1, got 0"),
    "planted_rank_lr_nan": ("planted_rank", "--lr nan", "--lr must be a finite number > 0, got nan"),
    "alpha_sweep_alphas_infinite": (
        "alpha_sweep",
        "--alphas 8,inf",
        "--alphas: '8,inf' is not a comma-separated list of positive, finite floats",
    ),
    "full_vs_lora_full_lr_zero": ("full_vs_lora", "--full-lr 0", "--full-lr must be a finite number > 0, got 0.0"),
    "intrinsic_dimension_lr_nan": (
        "intrinsic_dimension",
        "--lr 0.01,nan",
        "--lr: '0.01,nan' is not a comma-separated list of positive, finite floats",
    ),
    "intrinsic_dimension_scale_zero": (
        "intrinsic_dimension",
        "--scale 0",
        "--scale must be a finite number > 0, got 0.0",
    ),
    "e2e_limit_zero": ("e2e", "--limit 0", "--limit must be an integer >= 1, got 0"),
    "rank_sweep_out_is_a_file": ("rank_sweep", "--out {tmp}/f", "--out {tmp}/f is a file; choose a folder"),
}


@pytest.mark.parametrize("name", sorted(SCRIPT_CASES))
def test_research_script_option_fault(name, tmp_path, capsys):
    import importlib.util

    from jlora.cli import exit_status

    script, extra, message = SCRIPT_CASES[name]
    spec = importlib.util.spec_from_file_location(
        script, Path(__file__).resolve().parents[1] / "scripts" / f"{script}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "f").write_text("x")
    before = snapshot(tmp_path)
    argv = ["--quick", "--out", str(tmp_path / "out"), *shlex.split(extra.replace("{tmp}", str(tmp_path)))]
    assert exit_status(f"{script}.py", lambda: module.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"{script}.py: error: {message.replace('{tmp}', str(tmp_path))}"]
    assert snapshot(tmp_path) == before
