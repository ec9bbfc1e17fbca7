"""`trine <command>` (also `python -m trine`). One module per command group; one parser
(:mod:`trine.cli.parser`: both flag spellings, typed errors, one YAML/JSON file instead of flags)."""

from __future__ import annotations

import importlib
import logging
import sys

from trine.cli import curation, demo, encode, evaluation, export, generate, index, lora, serving, training
from trine.cli.parser import TrineArgumentParser, parse_command
from trine.errors import OptionError, report_user_errors


def build_parser() -> TrineArgumentParser:
    parser = TrineArgumentParser(prog="trine", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    curation.add_parsers(sub)
    generate.add_parsers(sub)
    training.add_parsers(sub)
    demo.add_parsers(sub)
    evaluation.add_parsers(sub)
    serving.add_parsers(sub)
    export.add_parsers(sub)
    index.add_parsers(sub)
    encode.add_parsers(sub)
    lora.add_parsers(sub)
    return parser


# Commands whose flags Hugging Face's argument parser owns (TrainingArguments and trine's dataclasses):
# they are dispatched before argparse, to ``<module>.main(argv, debug=...)``.
TRAINING_COMMANDS = {
    "finetune": "trine.training.finetune",
    "finetune-reranker": "trine.training.reranker",
    "pretrain": "trine.training.pretrain",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _leading_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--log-level X`` (the one option before the command) and the arguments after it."""
    level, rest = None, list(argv)
    while rest and (rest[0] == "--log-level" or rest[0].startswith("--log-level=")):
        if "=" in rest[0]:
            level, rest = rest[0].split("=", 1)[1], rest[1:]
        elif len(rest) > 1:
            level, rest = rest[1], rest[2:]
        else:
            break
    return level, rest


def main(argv: list[str] | None = None) -> int:
    """``trine <command>``. One exit-code policy for every command: 0 done; 2 a user's mistake (bad
    input, bad options, an unsafe output: ``error: <message>`` on stderr, no traceback, nothing
    written); 1 a failure while running (with its traceback). ``--log-level DEBUG`` shows the
    traceback of a user's mistake too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    level, rest = _leading_log_level(argv)
    debug = level == "DEBUG"
    if rest and rest[0] in TRAINING_COMMANDS:
        def train() -> int:
            if level is not None:
                if level not in LOG_LEVELS:
                    raise OptionError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
                logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
            module = importlib.import_module(TRAINING_COMMANDS[rest[0]])
            return module.main(rest[1:], debug=debug)

        return report_user_errors(train, debug=debug)
    parser = build_parser()
    if rest and not rest[0].startswith("-"):  # `trine <command> FILE.yaml` or flags
        args = report_user_errors(lambda: parse_command(parser, rest[0], rest[1:]), debug=debug)
        if isinstance(args, int):
            return args
        if level is not None and level not in LOG_LEVELS:
            print(f"error: --log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}", file=sys.stderr)
            return 2
        args.log_level = level or "WARNING"
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return report_user_errors(lambda: args.func(args), debug=args.log_level == "DEBUG")


