"""The `jlora` command's parser and entry point.

Each subcommand's handler is a module of this package (imported only when it runs, so
`jlora --help` stays fast); here the arguments are parsed and the library's errors become one
line on stderr: a `JloraError` (bad input) exits with status 2, a `RunError` with status 1, a run
stopped by Ctrl-C (`Interrupted`, after its checkpoint) with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from jlora.errors import Interrupted, JloraError, RunError


def _train(args: argparse.Namespace) -> int:
    from jlora.core.update.mesh import initialize_distributed
    from jlora.training.records.rundir import is_primary
    from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
    from jlora.training.run.train import train

    initialize_distributed()  # a no-op unless launched as a multi-host job (see jlora.core.update.mesh)
    cfg = load_run_config(args.config or DEFAULT_CONFIG, args.set)
    summary = train(cfg, args.out, until=args.until)
    if cfg.search is not None and summary["search"]["best"] is not None and is_primary():
        from jlora.research.search_report import write_report  # a finished search: its report

        written = write_report(args.out)
        print(f"search: best member {summary['search']['best']}; report in {', '.join(map(str, written))}")
    return 0


ONE_MEMBER = "member K of a population run, or best (a search's winner); required there (default: none, one adapter)"


def build_parser() -> argparse.ArgumentParser:
    """The `jlora` parser; every option's help says its default (docs/hooks.py makes the site's
    command-line page from it)."""
    from jlora.cli.members import parse_member, parse_one_member
    from jlora.training.run.config import packaged_configs

    parser = argparse.ArgumentParser(
        prog="jlora",
        description="LoRA fine-tuning of GPT-2 in JAX.",
        epilog="The research scripts and the benchmark (scripts/*.py) are not part of the installed package: "
        "they run from a clone of the repository.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        aliases=["sweep"],
        help="fine-tune with LoRA (resumes if RUN_DIR has a checkpoint); sweep: the same, for a search: section",
    )
    train.add_argument(
        "config",
        nargs="?",
        help=f"a YAML run config file, or the name of one shipped with jlora: {', '.join(packaged_configs())} "
        "(default: default, the embedded offline run)",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=1e-3 (repeatable; default: none)",
    )
    train.add_argument("--out", default="runs/default", metavar="RUN_DIR", help="run directory (default: runs/default)")
    train.add_argument(
        "--until",
        type=int,
        metavar="STEP",
        help="stop after update STEP (checkpointed; the schedule stays the config's steps); the same command goes on "
        "(default: the config's steps)",
    )
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="a run as a PEFT adapter folder or a merged HF checkpoint")
    export.add_argument("run_dir", metavar="RUN_DIR")
    where = export.add_mutually_exclusive_group(required=True)
    one = "(one of --peft, --merged is required)"
    where.add_argument("--peft", metavar="OUT_DIR", help=f"write adapter_config.json + adapter_model.safetensors {one}")
    where.add_argument("--merged", metavar="OUT_DIR", help=f"write a GPT-2 checkpoint with the adapter merged in {one}")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    export.add_argument(
        "--as-lora",
        action="store_true",
        help="an AdaLoRA run's adapter as a plain PEFT LoRA, its kept triplets' ranks in rank_pattern "
        "(default: PEFT's AdaLoRA format)",
    )
    export.add_argument("--member", type=parse_one_member, metavar="K", help=ONE_MEMBER)
    export.set_defaults(handler=_lazy("jlora.cli.export", "export_command"))

    gen = commands.add_parser("generate", help="continue prompts (a run, a PEFT folder or a HF checkpoint)")
    gen.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="run dir, PEFT adapter folder, or HF checkpoint dir / Hub id (default: none, with --adapter)",
    )
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable; --prompt or --prompts is required)")
    gen.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line (default: none)")
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="new tokens per prompt (default: 64, or as many as fit the model's positions)",
    )
    gen.add_argument(
        "--raw",
        action="store_true",
        help="feed the prompt as written (a run dir otherwise opens it as its training rows: end-of-text and, "
        "for QA runs, 'Question: PROMPT\\nAnswer:', unless the prompt is already in that form; default: off)",
    )
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens (default: off)")
    gen.add_argument(
        "--top-p", type=float, metavar="P", help="sample from the likeliest tokens whose mass passes P (default: off)"
    )
    gen.add_argument("--seed", type=int, default=0, help="the sampling seed (default: %(default)s)")
    add_search_options(gen, num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0)
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        metavar="P",
        help="scores of tokens a row already holds: times P where negative, over P where positive "
        "(transformers'; 1: off; default: %(default)s)",
    )
    gen.add_argument(
        "--base", help="base model of a PEFT folder (default: its base/ folder, else base_model_name_or_path)"
    )
    gen.add_argument("--tokenizer", help="tokenizer dir, Hub id or 'bytes' (default: the source's)")
    gen.add_argument(
        "--member",
        type=parse_member,
        metavar="K",
        help="member K of a population run, or best (a search's winner); K,L,... or all: their answers side by "
        "side (default: none, one adapter)",
    )
    gen.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="an adapter folder (or run, checkpoint), repeatable: the adapters' answers side by side, on --base "
        "(default: none)",
    )
    gen.set_defaults(handler=_lazy("jlora.cli.generate", "generate_command"))

    ev = commands.add_parser(
        "evaluate", help="decode a data-to-text test file (E2E's MR||text) with a run's adapter and score it"
    )
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="the test file: E2E's MR||text lines or {context, completion} JSON lines, several references per MR "
        "(required)",
    )
    add_search_options(ev, num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4)
    ev.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="new tokens per MR at most (default: %(default)s)"
    )
    ev.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="MRs decoded together (default: %(default)s)"
    )
    ev.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="only the first N MRs: a quick look (CIDEr then is not the full set's; default: all)",
    )
    ev.add_argument(
        "--metrics",
        default="bleu,nist,meteor,rouge_l,cider",
        metavar="M,...",
        help="the scores to compute; meteor, rouge_l and cider need Java (default: %(default)s)",
    )
    ev.add_argument("--member", type=parse_one_member, metavar="K", help=ONE_MEMBER)
    ev.add_argument(
        "--out",
        metavar="DIR",
        help="where outputs.jsonl, summary.json, e2e_ref.txt and e2e_pred.txt go (default: RUN_DIR/evaluate)",
    )
    ev.set_defaults(handler=_lazy("jlora.cli.evaluate", "evaluate_command"))

    comb = commands.add_parser("combine", help="one adapter from several, as PEFT combines them, as a PEFT folder")
    comb.add_argument("sources", nargs="+", metavar="SOURCE", help="run dirs, checkpoints or PEFT adapter folders")
    comb.add_argument("--weights", nargs="+", type=float, required=True, metavar="W", help="one per adapter (required)")
    comb.add_argument(
        "--method", default="svd", help="PEFT's combination_type (default: svd); see jlora.core.algebra.combine"
    )
    comb.add_argument(
        "--density",
        type=float,
        help="share of entries kept, in (0, 1]: ties*, dare_*, magnitude_prune* (default: none)",
    )
    comb.add_argument("--r", type=int, help="rank of an *svd method's result (PEFT's svd_rank; default: the largest)")
    comb.add_argument("--majority-sign", default="total", help="ties*: total or frequency (default: %(default)s)")
    comb.add_argument(
        "--clamp", type=float, help="*svd: clip the factors to this quantile (PEFT's svd_clamp; default: none)"
    )
    comb.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default: %(default)s)")
    comb.add_argument(
        "--member",
        type=parse_member,
        metavar="K",
        help="members of population runs: K, K,L,..., all or best (default: none, runs of one adapter)",
    )
    comb.add_argument("--base", help="base model of PEFT folders (default: their base/ folder, else the one recorded)")
    comb.add_argument("--out", required=True, metavar="DIR", help="the PEFT folder to write (required)")
    comb.set_defaults(handler=_lazy("jlora.cli.combine", "combine_command"))

    diag = commands.add_parser(
        "diagnose", help="spectrum and intruder dimensions of each adapter; --against: subspace similarity"
    )
    diag.add_argument("run_dir", metavar="RUN_DIR")
    diag.add_argument(
        "--against", metavar="RUN_DIR2", help="another run: phi(i, j) between the two runs' adapters (default: none)"
    )
    diag.add_argument("--step", type=int, help="checkpoint step of RUN_DIR (default: the newest)")
    diag.add_argument("--out", metavar="DIR", help="where diagnose.json and the plots go (default: RUN_DIR/diagnose)")
    diag.add_argument("--member", type=parse_one_member, metavar="K", help=ONE_MEMBER)
    diag.add_argument(
        "--against-member",
        type=parse_one_member,
        metavar="K",
        help="member K of the --against run (as --member; default: none)",
    )
    diag.add_argument(
        "--intruder-k", type=int, default=10, metavar="K", help="top singular vectors tested (default: %(default)s)"
    )
    diag.add_argument(
        "--intruder-epsilon", type=float, default=0.5, metavar="EPS", help="intruder threshold (default: %(default)s)"
    )
    diag.set_defaults(handler=_lazy("jlora.cli.diagnose", "diagnose_command"))
    return parser


def add_search_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """--num-beams, --length-penalty, --no-repeat-ngram-size, with `defaults` (generate: greedy; evaluate: the
    LoRA paper's)."""
    parser.add_argument(
        "--num-beams",
        type=int,
        default=defaults["num_beams"],
        metavar="N",
        help="beam search with N beams, as transformers' generate (1: greedy or sampled; default: %(default)s)",
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=defaults["length_penalty"],
        metavar="X",
        help="beam search scores a hypothesis (sum of log-probabilities) / new_tokens ** X (default: %(default)s)",
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=defaults["no_repeat_ngram_size"],
        metavar="K",
        help="no K-gram of a row (prompt and new tokens) made twice (0: off; default: %(default)s)",
    )


def _lazy(module: str, name: str):
    """A handler imported only when its subcommand runs (keeps `jlora --help` fast)."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return handler


def exit_status(name: str, run: Callable[[], object]) -> int:
    """Call `run`; jlora's errors become one line on stderr, prefixed with `name`, and an exit status.

    0 when `run` returns (its int if it returns one), 2 for bad input (`JloraError`), 1 for a run
    that cannot go on (`RunError`), 130 for a stop on request (`Interrupted`, Ctrl-C). The research
    scripts end through it too, so they answer a bad config as `jlora` does.
    """
    try:
        status = run()
    except JloraError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 130
    except RunError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return exit_status(f"jlora {args.command}", lambda: args.handler(args))
