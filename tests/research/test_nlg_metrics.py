"""The E2E scores: BLEU, NIST by hand and against nltk; METEOR, ROUGE-L, CIDEr as measure_scores.py runs them."""

from __future__ import annotations

import math

import pytest
from nltk.translate.bleu_score import corpus_bleu
from nltk.translate.nist_score import corpus_nist

from jlora.research.nlg_metrics import METRICS, NIST_BETA, coco_scores, mteval_tokens, nist, score
from jlora.training.data.data2text import clean_text
from jlora.training.data.sources import read_references

# E2E-shaped: three MRs with 3, 1 and 2 references (the test set has a variable number per MR)
REFERENCES = [
    [
        "The Vaults is a pub near Café Adriatic with a 5 star rating. Prices start at £30.",
        "Near Café Adriatic, The Vaults pub is highly rated and expensive.",
        "The Vaults is an expensive pub near Café Adriatic, rated 5 out of 5.",
    ],
    ["Aromi is a family friendly coffee shop by the riverside serving Chinese food."],
    [
        "The Cambridge Blue is a cheap restaurant serving English food.",
        "Serving cheap English food, The Cambridge Blue is a restaurant.",
    ],
]
HYPOTHESES = [
    "The Vaults is an expensive pub near Café Adriatic with a 5 star rating.",
    "Aromi is a coffee shop by the riverside that serves Chinese food and is family friendly.",
    "The Cambridge Blue is a restaurant that serves cheap English food.",
]


@pytest.fixture(scope="module")
def scores():
    return score(HYPOTHESES, REFERENCES)


# --- BLEU ------------------------------------------------------------------------------------------------------


def test_bleu_by_hand_on_two_sentences():
    hypotheses = ["the cat sat on the mat", "A pub near the river"]
    references = [["the cat is on the mat now", "cat sat on a mat"], ["a pub near the river in the city."]]
    # Sentence 1 (6 tokens), clipped by the largest count in either reference:
    #   1-grams the x2 (A has 2), cat, sat (B), on, mat                         6 of 6
    #   2-grams the cat (A), cat sat (B), sat on (B), on the (A), the mat (A)   5 of 5
    #   3-grams the cat sat, cat sat on (B), sat on the, on the mat (A)         2 of 4
    #   4-grams the cat sat on, cat sat on the, sat on the mat                   0 of 3
    #   reference length: A has 7 tokens, B 5; both 1 away from 6: the shorter, 5
    # Sentence 2 (5 tokens; "A" lower-cased; the reference "city." is "city ." after 13a: 9 tokens):
    #   1..4-grams all match: 5 of 5, 4 of 4, 3 of 3, 2 of 2; reference length 9
    # Corpus: 11/11, 9/9, 5/7, 2/5; output length 11, reference length 5 + 9 = 14 -> BP = exp(1 - 14/11)
    precisions = [11 / 11, 9 / 9, 5 / 7, 2 / 5]
    expected = 100 * math.exp(1 - 14 / 11) * math.exp(sum(map(math.log, precisions)) / 4)
    assert score(hypotheses, references, ["bleu"])["bleu"] == pytest.approx(expected, rel=1e-12)
    # the longer reference on the tie (7: reference length 16) would be another number
    assert expected != pytest.approx(100 * math.exp(1 - 16 / 11) * math.exp(sum(map(math.log, precisions)) / 4))


def test_bleu_equals_nltk_on_mteval_tokens_with_a_variable_number_of_references():
    """nltk's corpus BLEU (clipping by the largest reference count, closest reference length, shorter on a tie) is an
    independent implementation; on the same tokens it agrees with sacrebleu's as `score` calls it."""
    expected = corpus_bleu(
        [[mteval_tokens(r) for r in rs] for rs in REFERENCES], [mteval_tokens(h) for h in HYPOTHESES]
    )
    assert score(HYPOTHESES, REFERENCES, ["bleu"])["bleu"] == pytest.approx(100 * expected, rel=1e-12)
    assert 20 < 100 * expected < 90  # not degenerate: some 4-grams match, not all


def test_mteval_tokens_are_13a_lower_cased():
    # brackets and commas split; an apostrophe and a dash stay in a word, but a dash after a digit splits
    assert mteval_tokens("It's £30-£40, near Café Adriatic (family-friendly).") == (
        "it's £30 - £40 , near café adriatic ( family-friendly ) .".split()
    )
    assert mteval_tokens("Rated 4.5 out of 5, 1,000 seats.") == "rated 4.5 out of 5 , 1,000 seats .".split()


# --- NIST ------------------------------------------------------------------------------------------------------


def test_nist_equals_nltk_with_one_reference_per_mr():
    references = [rs[:1] for rs in REFERENCES]
    expected = corpus_nist(
        [[mteval_tokens(r) for r in rs] for rs in references], [mteval_tokens(h) for h in HYPOTHESES]
    )
    assert nist(HYPOTHESES, references) == pytest.approx(expected, rel=1e-12)
    assert expected > 2


def test_nist_information_weights_by_hand():
    # "the vaults is a pub ." against r1 (the same 6 tokens) and r2 "a pub : the vaults ." (6); 12 reference words
    # unigram counts: the 2, vaults 2, is 1, a 2, pub 2, . 2 -> info log2(12/2) five times, log2(12/1) for "is"
    # bigrams (all in r1): the vaults log2(2/2), vaults is log2(2/1), is a log2(1/1), a pub log2(2/2), pub . log2(2/1)
    # trigrams: the vaults is log2(2/1), vaults is a 0, is a pub 0, a pub . log2(2/1); 4-grams: all info 0
    expected = (5 * math.log2(6) + math.log2(12)) / 6 + 2 / 5 + 2 / 4
    refs = [["The Vaults is a pub.", "A pub: The Vaults."]]
    assert nist(["The Vaults is a pub."], refs) == pytest.approx(expected, rel=1e-12)


def test_nist_clips_by_every_reference_and_penalises_against_their_mean_length():
    """Where mteval (and so the challenge) and nltk part: several references per MR."""
    # "a b" against "a" and "b": each unigram is in one reference, both hit; info log2(2/1) = 1 each
    assert nist(["a b"], [["a", "b"]]) == pytest.approx(1.0)
    assert nist(["a b"], [["a", "b"]], max_n=1) == pytest.approx(1.0)
    assert corpus_nist([[["a"], ["b"]]], [["a", "b"]], n=1) == pytest.approx(0.5)  # nltk: the best single reference
    # "a b c" against 4 and 6 tokens: a, b, c carry log2(10/2) each, longer n-grams 0 bits;
    # the length penalty compares 3 with the mean reference length 5
    expected = math.log2(5) * math.exp(-NIST_BETA * math.log(3 / 5) ** 2)
    assert nist(["a b c"], [["a b c d", "a b c d e f"]]) == pytest.approx(expected, rel=1e-12)
    assert math.exp(-NIST_BETA * math.log(2 / 3) ** 2) == pytest.approx(0.5)  # beta's definition


# --- METEOR, ROUGE-L, CIDEr ------------------------------------------------------------------------------------


def test_coco_metrics_equal_coco_caption_run_as_measure_scores_does(scores, monkeypatch):
    """measure_scores.py builds COCO objects of the references and outputs and runs COCOEvalCap; its copy has no SPICE
    (pycocoevalcap's would download Stanford CoreNLP), so SPICE is stubbed out here."""
    import pycocoevalcap.eval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], "type": "captions", "images": [], "annotations": []}
    for i, refs in enumerate(REFERENCES):  # as measure_scores.create_coco_refs
        coco.dataset["images"].append({"id": f"inst-{i}"})
        for ref in refs:
            coco.dataset["annotations"].append(
                {"image_id": f"inst-{i}", "id": len(coco.dataset["annotations"]), "caption": ref}
            )
    coco.createIndex()
    outputs = coco.loadRes(resFile=[{"image_id": f"inst-{i}", "caption": h} for i, h in enumerate(HYPOTHESES)])
    official = COCOEvalCap(coco, outputs)
    official.evaluate()
    assert scores["meteor"] == pytest.approx(100 * official.eval["METEOR"], rel=1e-9)
    assert scores["rouge_l"] == pytest.approx(100 * official.eval["ROUGE_L"], rel=1e-9)
    assert scores["cider"] == pytest.approx(official.eval["CIDEr"], rel=1e-9)


def test_rouge_l_by_hand():
    # PTB tokens, lower-cased, "." removed: "the vaults is a pub" (5) against "the vaults pub is near" (5) and
    # "a pub" (2). LCS 3 (the vaults pub/is) and 2 (a pub): precision max(3/5, 2/5), recall max(3/5, 2/2) = 1
    p, r, beta = 3 / 5, 1.0, 1.2
    expected = 100 * (1 + beta**2) * p * r / (r + beta**2 * p)
    got = coco_scores(["The Vaults is a pub."], [["The Vaults pub is near.", "A pub."]], ["rouge_l"])
    assert got == {"rouge_l": pytest.approx(expected, rel=1e-12)}


def test_a_line_break_inside_an_output_does_not_shift_the_tokenizers_lines():
    # coco-caption's PTB tokenizer pairs output lines with inputs in order; "\r" would make two lines of one
    got = coco_scores(
        ["The Vaults\ris a pub.", "Aromi is a coffee shop."],
        [["The Vaults is a pub."], ["Aromi is a coffee shop."]],
        ["rouge_l"],
    )
    assert got["rouge_l"] == pytest.approx(100)


def test_cider_document_frequencies_come_from_the_references_scored():
    one = coco_scores(HYPOTHESES[:1], REFERENCES[:1], ["cider"])["cider"]
    alone = coco_scores(HYPOTHESES[:2], REFERENCES[:2], ["cider"])["cider"]
    assert one == pytest.approx(0.0)  # one MR: every n-gram of its references has df = N, idf log(1/1) = 0
    assert alone > 0


# --- the challenge's scale -------------------------------------------------------------------------------------


def test_scores_are_on_the_papers_scale(scores):
    assert list(scores) == list(METRICS)
    assert all(isinstance(v, float) for v in scores.values())
    # per cent for BLEU, METEOR, ROUGE-L (LoRA's Table 3: 70.4, 46.8, 71.8); NIST ~ 8.85 and CIDEr ~ 2.53 as printed
    assert 20 < scores["bleu"] < 90 and 20 < scores["meteor"] < 90 and 40 < scores["rouge_l"] < 95
    assert 1 < scores["nist"] < 10 and 0 < scores["cider"] < 10


def test_a_perfect_output_scores_the_top_of_the_scale():
    perfect = score([rs[-1] for rs in REFERENCES], REFERENCES)
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(100)
    assert perfect["meteor"] == pytest.approx(100)
    # NIST and CIDEr have no fixed top: they weigh each n-gram by how rare it is in the references


def test_a_test_file_grouped_decoded_and_scored(tmp_path):
    """The path of an evaluation: references grouped by MR, one decoded output per MR cleaned as gpt2_decode.py does."""
    lines = [f"MR {i}||{ref}" for i, refs in enumerate(REFERENCES) for ref in refs]
    path = tmp_path / "test.txt"
    path.write_text("\n".join([lines[0], lines[-1], *lines[1:-1]]) + "\n", encoding="utf-8")  # MR 2 before the rest
    contexts, references = read_references(path)
    assert contexts == ["MR 0", "MR 2", "MR 1"]
    decoded = {context: f" {refs[-1]}\n\nMR 9 ||<|endoftext|>" for context, refs in zip(contexts, references)}
    hypotheses = [clean_text(decoded[context]) for context in contexts]
    scores = score(hypotheses, references, ["bleu", "nist"])
    assert scores["bleu"] == pytest.approx(100)
    assert scores == score([rs[-1] for rs in references], references, ["bleu", "nist"])


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="2 hypotheses but references for 1 MRs"):
        score(["a", "b"], [["a"]], ["bleu"])
    with pytest.raises(ValueError, match="MR 0: expected a non-empty list"):
        score(["a"], [[]], ["bleu"])
    with pytest.raises(ValueError, match="MR 0: expected a non-empty list"):
        score(["a"], ["a"], ["bleu"])  # a string is not a list of references
    with pytest.raises(ValueError, match="unknown metrics"):
        score(["a"], [["a"]], ["bleu", "ter"])
    # whitespace is collapsed, as the script's stripped lines are
    assert score([" a  b\n"], [["a b"]], ["bleu", "nist"]) == score(["a b"], [["a b"]], ["bleu", "nist"])
