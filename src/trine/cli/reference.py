"""The command-line reference as markdown, rendered from the parsers themselves (``trine <command> --help`` for
every command and sub-command), so the docs page cannot drift from the code. The docs site's build hook
(``docs/hooks/cli_reference.py``) calls :func:`render_markdown`."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Iterator

# Wide enough for the flag lists, fixed so that the page does not depend on the terminal that builds it.
HELP_COLUMNS = 100


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_names() -> list[str]:
    """Every command, sub-commands as ``group sub`` (``index build``), in the parser's order."""
    from trine.cli import build_parser

    names = []
    for name, sub in _subcommands(build_parser()).items():
        nested = _subcommands(sub)
        names.append(name)
        names.extend(f"{name} {child}" for child in nested)
    return names


@contextlib.contextmanager
def _fixed_terminal(prog: str) -> Iterator[None]:
    """argparse reads the width from COLUMNS and Hugging Face's parser its program name from sys.argv[0]."""
    saved_columns, saved_argv = os.environ.get("COLUMNS"), sys.argv
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    sys.argv = [prog]
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns


def command_help(name: str) -> str:
    """What ``trine <name> --help`` prints (``name`` may be ``group sub``)."""
    from trine.cli import main

    out = io.StringIO()
    with _fixed_terminal(f"trine {name}"), contextlib.redirect_stdout(out):
        try:
            code = main([*name.split(), "--help"])
        except SystemExit as done:  # argparse and Hugging Face's parser exit after printing the help
            code = done.code
    if code not in (0, None):
        raise RuntimeError(f"trine {name} --help exited {code}")
    return out.getvalue().rstrip() + "\n"


def render_markdown() -> str:
    """The whole reference page: a list of commands, then each command's help text."""
    names = command_names()
    parts = [
        "# Command-line reference\n",
        "Generated from the parsers when this site is built: each section is exactly what "
        "`trine <command> --help` prints. Every command also takes one YAML or JSON file of the same options as "
        "its only argument (`trine finetune train.yaml`), and both spellings of every flag (`--query_max_len`, "
        "`--query-max-len`). `--log-level DEBUG` before the command shows tracebacks.\n",
        "Exit codes: 0 done; 2 a mistake in the input or options (`error: ...`, nothing written); "
        "1 a failure while running.\n",
    ]
    parts.extend(f"- [`trine {n}`](#{n.replace(' ', '-')})" for n in names)
    parts.append("")
    for name in names:
        parts.append(f'## trine {name} {{#{name.replace(" ", "-")}}}\n')
        parts.append("```text\n" + command_help(name) + "```\n")
    return "\n".join(parts)
