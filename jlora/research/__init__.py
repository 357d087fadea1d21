"""Research on top of training: what a trained update looks like, and experiments that test claims.

    allocation.py    every way of choosing r at one budget (EVA, AdaLoRA, LoRA-GA, PiSSA, jlora's), trained, scored
    diagnose.py      spectrum of every adapter's dW, phi(i, j) between two runs, telemetry over steps
    experiments.py   in-memory tasks and fits for sweeps (a population at once); a full fine-tune's dW
    fastfood.py      the Fastfood transform: a D x d random projection applied in O(D log d)
    forgetting.py    learning against forgetting on held-out text; a base pretrained on it
    intrinsic.py     training in random d-dimensional subspaces (theta_0 + P z), many d at once; d90
    nlg_eval.py      a data-to-text test file decoded with an adapter (beam search, cut, cleaned), as the paper did
    nlg_metrics.py   the E2E NLG Challenge's BLEU, NIST, METEOR, ROUGE-L and CIDEr of outputs against references
    planted.py       a known rank-k update planted in a model, recovered by distillation; rows sampled from it
    plots.py         matplotlib figures (Agg, no pyplot state)
    search_report.py what a search found: leaderboard, curves, the winner's update, the source's heuristics

May import training, exchange and the core; the scripts in scripts/ compose these.
"""
