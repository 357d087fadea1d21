"""`jlora generate` on a run directory: the run's own prompt form, and defaults that fit the model."""

from jlora.cli import main
from jlora.core.generate import generate
from jlora.training.data.tokenizer import ByteTokenizer
from jlora.training.records.checkpoint import load_run

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
