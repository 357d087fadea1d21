"""The E2E NLG Challenge's five scores (BLEU, NIST, METEOR, ROUGE-L, CIDEr), as the LoRA paper reports them.

    contexts, references = read_references("e2e/test.txt")   # jlora.training.data.sources: N MRs, (N, R_i)
    hypotheses = [...]                                        # (N,): one output per MR, in the same order
    score(hypotheses, references)
    # {"bleu": 70.4, "nist": 8.85, "meteor": 46.8, "rouge_l": 71.8, "cider": 2.53}  (Table 3, GPT-2 M + LoRA)

The official scorer is the challenge's ``measure_scores.py`` (tuetschek/e2e-metrics), which
microsoft/LoRA runs as ``measure_scores.py e2e_ref.txt e2e_pred.txt -p``: BLEU and NIST from its
Python port of mteval-v13a (``metrics/pymteval.py``, selected by ``-p``), METEOR, ROUGE-L and CIDEr
from the MS-COCO caption evaluation code (coco-caption). It prints fractions; the paper, and
`score`, give BLEU, METEOR and ROUGE-L in per cent, NIST and CIDEr as printed. Each metric here::

    metric    computed by                                   same as measure_scores.py -p?
    bleu      sacrebleu BLEU(tokenize="13a", lowercase=True) yes, but for an empty output or one under 3 tokens
    nist      `nist` below (pymteval's NIST, re-implemented)  yes, but for outputs under 4 tokens
    meteor    pycocoevalcap: meteor-1.5.jar -l en -norm     yes: the same jar and paraphrase table
    rouge_l   pycocoevalcap Rouge                           yes: the same code
    cider     pycocoevalcap Cider (CIDEr-D)                 yes: the same code and document frequencies

BLEU (corpus level, n <= 4). sacrebleu's 13a tokenizer is pymteval's: the same SGML unescaping
and the same four punctuation rules of mteval-v13a. Both lower-case (pymteval's default is
case-insensitive); both take the reference closest in length to the output, the shorter on a tie;
a MR with fewer references than the most has its missing ones passed as None, which sacrebleu
skips. Where they part: an empty output is one empty token to pymteval and none here; pymteval
counts ``len - n + 1`` n-grams even when that is negative (an output under 3 tokens), sacrebleu
none; and a corpus with no matching 4-gram scores 0 here, about 1e-4 there (pymteval floors a
zero count at 1e-15). On real outputs the two agree to every printed digit.

NIST (corpus level, n <= 5). No installable library computes it as mteval does with several
references: nltk's ``corpus_nist`` scores each output against its single best reference and that
reference's length, not against the counts clipped by all of them. So `nist` implements
pymteval's definition: information weights info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))
over every reference of the corpus (the count of the empty n-gram is the number of reference
words), hits clipped by the largest count in any one reference of the MR, the length penalty
exp(-beta ln^2(min(1, L_sys / L_ref))) with beta = -ln 0.5 / ln^2 1.5 and L_ref the sum over MRs of
their mean reference length; tokens as for BLEU. With one reference per MR it equals nltk's
``corpus_nist`` (tested). pymteval's own note says that the Perl mteval-v13a-sig.pl differs with a
variable number of references; microsoft/LoRA's ``-p`` runs pymteval, which is the target here.

METEOR, ROUGE-L, CIDEr. pycocoevalcap (1.2, the Python 3 packaging of coco-caption) ships the
same jars as the challenge's copy: every sentence goes through Stanford CoreNLP 3.4.1's
PTBTokenizer (``-lowerCase``, punctuation tokens removed), then

- METEOR 1.5 (``-l en -norm``: exact, stem, synonym and paraphrase matches with the English
  paraphrase table the package carries), its statistics summed over the corpus before scoring;
- ROUGE-L: per MR, the longest common subsequence with each reference; the largest precision and
  the largest recall over the references, F with beta = 1.2; the mean over MRs (not `rouge-score`'s
  ROUGE-L, which tokenizes differently, uses beta = 1 and the best F);
- CIDEr-D: n <= 4, tf-idf vectors clipped to the reference's, a Gaussian length penalty (sigma 6),
  times 10, averaged over references and MRs. The document frequencies come from the references
  being scored, so CIDEr depends on the set: a 50-MR sample's CIDEr is not comparable with the
  full test set's (the other four are averages or sums, stable under sampling).

These three need Java on PATH (the challenge used 1.8; OpenJDK 17 runs the same jars); METEOR's
JVM takes about 10 s to load its paraphrase table. BLEU and NIST are pure Python::

    >>> scores = score(["The Vaults is a pub."], [["The Vaults is a pub.", "A pub: The Vaults."]], ("bleu", "nist"))
    >>> round(scores["bleu"], 1), round(scores["nist"], 3)
    (100.0, 3.652)

Every string is stripped and its whitespace (line breaks included) collapsed first: the official
script reads one stripped line per output.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
COCO_METRICS = ("meteor", "rouge_l", "cider")  # the ones that go through the PTB tokenizer (Java)
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # the penalty is 0.5 where the output is 2/3 of the references

_tokenize_13a = Tokenizer13a()


def score(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """The challenge's scores of one output per MR against that MR's references (several, any number).

    Args:
      hypotheses: (N,) the system's outputs.
      references: (N, R_i) the references of each output's MR; R_i >= 1 may differ between MRs.
      metrics: which of METRICS to compute (meteor, rouge_l and cider need Java).

    Returns {metric: value} in `metrics`' order: bleu, meteor, rouge_l in per cent (70.4), nist and
    cider as the script prints them (8.85, 2.53).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {', '.join(METRICS)}")
    scores = {}
    if "bleu" in metrics:
        scores["bleu"] = bleu(hypotheses, references)
    if "nist" in metrics:
        scores["nist"] = nist(hypotheses, references)
    coco = [m for m in metrics if m in COCO_METRICS]
    if coco:
        scores.update(coco_scores(hypotheses, references, coco))
    return {m: scores[m] for m in metrics}


def _checked(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str) or not len(hypotheses):
        raise ValueError("hypotheses must be a non-empty list of strings")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but references for {len(references)} MRs")
    hyps = [" ".join(h.split()) for h in hypotheses]
    refs = []
    for i, rs in enumerate(references):
        if isinstance(rs, str) or not len(rs):
            raise ValueError(f"MR {i}: expected a non-empty list of reference strings, got {rs!r}")
        rs = [" ".join(r.split()) for r in rs]
        if not all(rs):
            raise ValueError(f"MR {i}: an empty reference")
        refs.append(rs)
    return hyps, refs


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's tokens of `text`, lower-cased (what BLEU and NIST count).

    >>> mteval_tokens("Near Café Adriatic, prices start at £30.")
    ['near', 'café', 'adriatic', ',', 'prices', 'start', 'at', '£30', '.']
    """
    return _tokenize_13a(text.lower()).split()


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in per cent (sacrebleu; 13a tokens, lower-cased, closest reference length, no smoothing)."""
    hypotheses, references = _checked(hypotheses, references)
    width = max(len(rs) for rs in references)
    streams = [[rs[k] if k < len(rs) else None for rs in references] for k in range(width)]
    metric = BLEU(tokenize="13a", lowercase=True, smooth_method="none")
    return float(metric.corpus_score(list(hypotheses), streams).score)


def _ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(tokens[i:] for i in range(n)), strict=False)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST as the challenge's pymteval computes it (the module docstring gives the formula).

    >>> round(nist(["a b"], [["a", "b"]]), 6)  # each unigram is in one reference: both hit, 1 bit each
    1.0
    """
    hypotheses, references = _checked(hypotheses, references)
    hyps = [mteval_tokens(h) for h in hypotheses]
    refs = [[mteval_tokens(r) for r in rs] for rs in references]
    counts = Counter()  # every reference n-gram of the corpus, n = 0 (the empty n-gram: reference words) .. max_n
    for rs in refs:
        for r in rs:
            counts[()] += len(r)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(r, n))
    gain, n_hyp = [0.0] * max_n, [0] * max_n
    for h, rs in zip(hyps, refs):
        for n in range(1, max_n + 1):
            clip = Counter()
            for r in rs:
                clip |= Counter(_ngrams(r, n))  # the largest count in any one reference
            hits = Counter(_ngrams(h, n)) & clip
            gain[n - 1] += sum(math.log2(counts[g[:-1]] / counts[g]) * k for g, k in hits.items())
            n_hyp[n - 1] += max(0, len(h) - n + 1)
    ratio = sum(map(len, hyps)) / sum(sum(map(len, rs)) / len(rs) for rs in refs)
    penalty = math.exp(-NIST_BETA * math.log(ratio) ** 2) if 0 < ratio < 1 else float(ratio >= 1)
    return penalty * sum(g / max(k, 1) for g, k in zip(gain, n_hyp))


@contextlib.contextmanager
def _meteor() -> Iterator[Meteor]:
    scorer = Meteor()  # starts the JVM
    try:
        yield scorer
    finally:  # pycocoevalcap stops it only when the object is collected; a 2 GB JVM should not wait for that
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def coco_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = COCO_METRICS
) -> dict[str, float]:
    """METEOR and ROUGE-L in per cent and CIDEr(-D), through coco-caption's PTB tokenizer (needs Java).

    The tokenizer reads one sentence a line and pairs its output lines with the inputs in order, so a
    carriage return or U+2028 inside a sentence would shift every score after it: `_checked` collapses them.
    """
    hypotheses, references = _checked(hypotheses, references)
    if shutil.which("java") is None:
        raise RuntimeError(
            f"{', '.join(metrics)} need Java (coco-caption's tokenizer and METEOR are jars): none on PATH"
        )
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    scores = {}
    if "meteor" in metrics:
        with _meteor() as meteor:
            scores["meteor"] = 100 * float(meteor.compute_score(gts, res)[0])
    if "rouge_l" in metrics:
        scores["rouge_l"] = 100 * float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores
