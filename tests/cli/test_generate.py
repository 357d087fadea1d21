"""`jlora generate` on a run directory: the run's own prompt form, and defaults that fit the model."""

import pytest

from jlora.cli import main
from jlora.cli.generate import load_source, one_line
from jlora.core.decoding.generate import generate
from jlora.core.lora.adapter import map_factors
from jlora.training.data.tokenizer import ByteTokenizer
from jlora.training.records.artifacts import load_run

QUESTION = "What is 23 plus 19?"
TEMPLATED = f"Question: {QUESTION}\nAnswer:"


def test_a_run_is_asked_in_its_training_form_with_as_many_tokens_as_fit(default_run, capsys):
    model, params, lora, _, _ = load_run(default_run)

    def continuation(ids: list[int], max_new_tokens: int) -> str:
        out = generate(model, params, [ids], lora=lora, max_new_tokens=max_new_tokens, eos_token_id=256)
        return ByteTokenizer().decode(out.sequences()[0])

    capsys.readouterr()
    assert main(["generate", str(default_run), "--prompt", QUESTION]) == 0
    out, err = capsys.readouterr()
    ids = [256, *TEMPLATED.encode()]  # end-of-text opens every training row, then the QA template
    room = 64 - len(ids)  # the default model has 64 positions: fewer than 64 new tokens fit
    assert out == TEMPLATED + continuation(ids, room) + "\n"
    assert f"note: {room} new tokens at most: the longest prompt takes {len(ids)} of the model's 64 positions" in err

    # --raw: the text's own tokens, nothing added
    assert main(["generate", str(default_run), "--raw", "--prompt", TEMPLATED, "--max-new-tokens", str(room)]) == 0
    assert capsys.readouterr().out == TEMPLATED + continuation(list(TEMPLATED.encode()), room) + "\n"


def test_a_prompt_already_in_the_template_goes_as_written(default_run, capsys):
    """README's own export example writes the template out; asked of the run, it must not be wrapped again."""
    capsys.readouterr()
    assert main(["generate", str(default_run), "--prompt", QUESTION, "--max-new-tokens", "4"]) == 0
    wrapped = capsys.readouterr().out
    assert main(["generate", str(default_run), "--prompt", TEMPLATED, "--max-new-tokens", "4"]) == 0
    written = capsys.readouterr().out
    assert written == wrapped and written.startswith(TEMPLATED) and "Question: Question:" not in written


def answers(out: str, n_adapters: int) -> dict[str, list[str]]:
    """{prompt text: each adapter's answer} from side-by-side output (a prompt's lines, then one per adapter)."""
    lines, table, i = out.splitlines(), {}, 0
    while i < len(lines):
        j = next(k for k in range(i, len(lines)) if lines[k].startswith("  "))
        table["\n".join(lines[i:j])] = [line.split(" | ", 1)[1] for line in lines[j : j + n_adapters]]
        i = j + n_adapters
    return table


def alone(source: str, prompts: list[str], max_new_tokens: int, **options) -> list[str]:
    """What `jlora generate SOURCE` answers to each prompt alone (its `load_source` and `generate`), as one line."""
    model, params, lora, tokenizer, prompt = load_source(source, **options)
    encoded = [prompt(text)[1] for text in prompts]
    out = generate(
        model, params, encoded, lora=lora, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id
    )
    return [one_line(tokenizer.decode(row)) for row in out.sequences()]


def test_a_populations_members_answer_side_by_side(population_run, capsys):
    """`--member all`: one mixed batch whose answers are, member by member, what `--member K` answers alone."""
    questions = [QUESTION, "Is 736 even or odd?"]
    capsys.readouterr()
    args = [str(population_run), "--prompt", questions[0], "--prompt", questions[1], "--max-new-tokens", "8"]
    assert main(["generate", *args, "--member", "all"]) == 0
    out, err = capsys.readouterr()
    assert "3 adapters x 2 prompts as one mixed batch" in err
    table = answers(out, 3)
    assert list(table) == [f"Question: {q}\nAnswer:" for q in questions]
    labels = [line.split(" | ")[0].strip() for line in out.splitlines()[2:5]]
    assert labels == ["0 r=1,alpha=2", "1 r=2,alpha=8,seed=1", "2 r=4,alpha=4,lr=0.1"]
    for k in range(3):
        assert alone(str(population_run), questions, 8, member=k) == [row[k] for row in table.values()]


@pytest.fixture(scope="module")
def lively_folders(tmp_path_factory):
    """A GPT-2 with large random weights and a byte-level tokenizer, and 3 PEFT adapters on it (ranks 1, 2, 4)."""
    import jax

    import jlora
    from jlora.exchange.peft import save_peft

    from ..conftest import make_hf_checkpoint, save_byte_level_tokenizer

    root = tmp_path_factory.mktemp("lively")
    vocab = save_byte_level_tokenizer(root / "base")
    make_hf_checkpoint(root / "base", seed=3, initializer_range=0.4, vocab_size=vocab, n_positions=64, n_embd=32,
                       n_layer=2, n_head=2)  # fmt: skip
    _, params = jlora.load_gpt2(root / "base")
    for k, r in enumerate((1, 2, 4)):
        cfg = jlora.LoraConfig(r=r, alpha=2 * r, target_modules=("c_attn", "c_fc"))
        lora = jlora.init_lora(jax.random.key(k), cfg, params)
        lora = map_factors(lambda x, k=k: 0.5 * jax.random.normal(jax.random.key(10 + k), x.shape), lora)
        save_peft(root / f"adapter{k}", lora, cfg, base_model_name_or_path=None)
    return root


def test_adapter_folders_answer_side_by_side(lively_folders, capsys):
    """`--adapter A --adapter B --adapter C --base BASE`: one mixed batch; each answer is the folder's alone."""
    folders = [str(lively_folders / f"adapter{k}") for k in range(3)]
    prompts, base = ["The cat", "Once upon a time"], ["--base", str(lively_folders / "base"), "--max-new-tokens", "6"]
    capsys.readouterr()
    args = [a for f in folders for a in ("--adapter", f)] + [a for p in prompts for a in ("--prompt", p)]
    assert main(["generate", *args, *base]) == 0
    out, err = capsys.readouterr()
    assert "3 adapters x 2 prompts as one mixed batch" in err
    table = answers(out, 3)
    assert list(table) == prompts
    assert all(len(set(row)) == 3 for row in table.values())  # the adapters answer differently
    for k, folder in enumerate(folders):
        assert alone(folder, prompts, 6, base=base[1]) == [row[k] for row in table.values()]


def test_adapters_with_trained_leaves_answer_one_after_another(population_run, default_run, tmp_path, capsys):
    """The default run trains ln_f, which a mixed batch cannot share: the folders decode one after another."""
    assert main(["export", str(default_run), "--peft", str(tmp_path / "a")]) == 0
    assert main(["export", str(population_run), "--member", "1", "--peft", str(tmp_path / "b")]) == 0
    prompt = ["--prompt", TEMPLATED, "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"), *prompt]) == 0
    out, err = capsys.readouterr()
    assert "2 adapters one after another (they train base leaves" in err
    (row,) = answers(out, 2).values()
    assert [alone(str(tmp_path / name), [TEMPLATED], 6)[0] for name in "ab"] == row
    assert main(["generate", str(default_run), "--adapter", str(tmp_path / "a"), *prompt]) == 2
    assert "not both" in capsys.readouterr().err


def test_beam_search_on_the_command_line(default_run, capsys):
    model, params, lora, _, _ = load_run(default_run)
    options = dict(num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2, repetition_penalty=1.3)
    ids = [256, *TEMPLATED.encode()]
    out = generate(model, params, [ids], lora=lora, max_new_tokens=6, eos_token_id=256, **options)
    greedy = generate(model, params, [ids], lora=lora, max_new_tokens=6, eos_token_id=256)
    assert out.sequences() != greedy.sequences()  # the options reach the search
    flags = [
        "--num-beams",
        "3",
        "--length-penalty",
        "0.8",
        "--no-repeat-ngram-size",
        "2",
        "--repetition-penalty",
        "1.3",
    ]
    capsys.readouterr()
    assert main(["generate", str(default_run), "--prompt", QUESTION, "--max-new-tokens", "6", *flags]) == 0
    assert capsys.readouterr().out == TEMPLATED + ByteTokenizer().decode(out.sequences()[0]) + "\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-beams", "0"], "--num-beams must be an integer >= 1, got 0"),
        (["--num-beams", "2", "--temperature", "0.7"], "--num-beams 2 searches, it does not sample"),
        (["--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
        (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size must be an integer >= 0, got -2"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0, got 0.0"),
        (["--num-beams", "200"], "--num-beams 200: beam search keeps 2 x num_beams candidates of the model's 257"),
    ],
)
def test_bad_search_options_are_one_line_and_status_2(default_run, flags, message, capsys):
    capsys.readouterr()
    assert main(["generate", str(default_run), "--prompt", QUESTION, "--max-new-tokens", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jlora generate: error: ") and message in err and len(err.strip().splitlines()) == 1
