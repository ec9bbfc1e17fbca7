"""`trine <command>` (also `python -m trine`). One module per command group; one parser
(:mod:`trine.cli.parser`: both flag spellings, typed errors, one YAML/JSON file instead of flags).

The command groups' modules define parsers only (argparse-level imports); each handler imports
its stack (torch, transformers, FAISS, FastAPI, databases) when it runs, so ``trine --help``
starts in a fraction of a second."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from trine.cli import curation, demo, encode, evaluation, export, generate, index, lora, serving, training
from trine.cli.parser import FLAG_ALIASES, TrineArgumentParser, parse_command
from trine.config import command_line_words
from trine.errors import OptionError, report_user_errors

QUIET_FLAGS = next(group for group in FLAG_ALIASES if "--quiet" in group)
SUMMARY = "trine: train, evaluate and serve multi-function (dense + lexical + ColBERT) text embeddings."


def _version() -> str:
    from trine import __version__

    return __version__


def build_parser() -> TrineArgumentParser:
    parser = TrineArgumentParser(prog="trine", description=SUMMARY,
                                 epilog="`trine <command> --help` shows a command's options.")
    parser.add_argument("--version", action="version", version=f"trine {_version()}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
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
    for command in sub.choices.values():
        _add_quiet(command)
    return parser


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` on every command (and nested command) that has no spelling of it yet: it silences
    every progress bar of the run (:func:`trine.progress.silence`, called by :func:`main`). The
    training commands take it before Hugging Face's parser sees their flags (see :func:`main`)."""
    if not parser.add_help:  # a training command: its flags are Hugging Face's parser's
        return
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in nested:
        for command in action.choices.values():
            _add_quiet(command)
    if not nested and not any(flag in parser._option_string_actions for flag in QUIET_FLAGS):
        parser.add_argument(QUIET_FLAGS[0], action="store_true", help="no progress bars (trine's, Hugging Face's)")


def _quiet(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Whether the parsed command asked for ``--quiet`` (under whichever dest the command declared it)."""
    dests = {a.dest for p in _parsers(parser) for a in p._actions if set(a.option_strings) & set(QUIET_FLAGS)}
    return any(getattr(args, dest, False) is True for dest in dests)


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                out += _parsers(command)
    return out


def _command_list(parser: argparse.ArgumentParser) -> str:
    """The usage and every command with its one-line help (``trine`` alone prints it)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    width = max(len(c.dest) for c in sub._choices_actions)
    lines = [parser.format_usage().rstrip(), "", SUMMARY, "", "commands:"]
    lines += [f"  {c.dest:<{width}}  {c.help or ''}" for c in sub._choices_actions]
    lines += ["", "`trine <command> --help` shows a command's options; `trine --help` the global ones."]
    return "\n".join(lines)


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
        if any(flag in rest[1:] for flag in QUIET_FLAGS):  # before Hugging Face's parser (which has no such flag)
            from trine.progress import silence

            silence()
            rest = [rest[0], *(a for a in rest[1:] if a not in QUIET_FLAGS)]

        def train() -> int:
            if level is not None:
                if level not in LOG_LEVELS:
                    raise OptionError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
                logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
            module = importlib.import_module(TRAINING_COMMANDS[rest[0]])
            return module.main(rest[1:], debug=debug)

        return report_user_errors(train, debug=debug)
    parser = build_parser()
    if not rest:  # `trine` alone: what it can do, as a usage error (exit 2), without a traceback
        print(_command_list(parser), file=sys.stderr)
        return 2
    if rest and not rest[0].startswith("-"):  # `trine <command> FILE.yaml` or flags
        args = report_user_errors(lambda: parse_command(parser, rest[0], rest[1:]), debug=debug)
        if isinstance(args, int):
            return args
        if level is not None and level not in LOG_LEVELS:
            print(f"error: --log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}", file=sys.stderr)
            return 2
        args.log_level = level or "WARNING"
    else:
        args = report_user_errors(lambda: parser.parse_args(argv), debug=debug)
        if isinstance(args, int):
            return args
    if _quiet(args, parser):
        from trine.progress import silence

        silence()
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    flags = {flag for p in _parsers(parser) for flag in p._option_string_actions}
    return report_user_errors(lambda: args.func(args), debug=args.log_level == "DEBUG",
                              words=lambda message: command_line_words(message, flags))


