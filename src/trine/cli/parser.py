"""The one option parser of the argparse commands: both spellings, typed errors, config files.

- Every ``--snake_case`` flag is also accepted as ``--kebab-case`` and the other way round
  (Hugging Face's parser does the same for the training commands).
- A bad value, an unknown or a missing option raises :class:`~trine.errors.OptionError` (exit 2
  through the command line's one policy) instead of printing the usage.
- ``trine <command> FILE.yaml`` (or ``.yml`` / ``.json``, the file as the only argument) reads the
  options from a mapping of option: value, checked as the flags would be, errors naming the file
  and line: the same as ``trine finetune FILE.yaml``.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from trine.config import CONFIG_SUFFIXES, flag_message, parse_bool, read_config_file
from trine.errors import OptionError, options_checked  # noqa: F401 (re-exported for the commands)


def other_spelling(flag: str) -> str:
    """``--query_max_len`` <-> ``--query-max-len`` (the part after the dashes)."""
    body = flag[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


class TrineArgumentParser(argparse.ArgumentParser):
    """argparse with both flag spellings, no abbreviations, and errors raised as OptionError."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        spelled = list(names)
        for name in names:
            if name.startswith("--"):
                alt = other_spelling(name)
                if alt not in spelled:
                    spelled.append(alt)
        return super().add_argument(*spelled, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise OptionError(flag_message(message) + f" (see `{self.prog} --help`)")


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def is_config_file(argv: list[str]) -> bool:
    return len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES)


def config_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The options of a YAML/JSON file as the flags ``parser`` takes (keys in either spelling)."""
    data, lines = read_config_file(path)
    by_name: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            by_name[flag[2:].replace("-", "_")] = action
        if not action.option_strings and action.dest not in ("help",):
            by_name[action.dest.replace("-", "_")] = action
    argv: list[str] = []
    positionals: list[str] = []
    seen: dict[str, str] = {}
    problems: list[str] = []

    def at(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else path

    for key, value in data.items():
        name = key.replace("-", "_")
        action = by_name.get(name)
        if action is None or action.dest == "help":
            problems.append(f"{at(key)}: {key}: unknown option")
            continue
        if action.dest in seen:
            problems.append(f"{at(key)}: {key}: given twice (also as {seen[action.dest]})")
            continue
        seen[action.dest] = key
        if not action.option_strings:
            positionals.append(str(value))
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            try:
                if parse_bool(value, key):
                    argv.append(flag)
            except OptionError as err:
                problems.append(f"{at(key)}: {err}")
            continue
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(action, argparse._AppendAction):
            for v in values:
                argv += [flag, str(v)]
        elif action.nargs in ("+", "*"):
            argv += [flag, *(str(v) for v in values)]
        elif isinstance(value, list):  # a comma-separated option (k values, weights)
            argv += [flag, ",".join(str(v) for v in values)]
        else:
            argv += [flag, str(value)]
    if problems:
        raise OptionError("\n".join(problems))
    return positionals + argv


def parse_command(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> argparse.Namespace:
    """``trine <command> ...``: flags, or one config file, parsed by the command's own parser."""
    if is_config_file(argv):
        try:
            return parser.parse_args([command, *config_to_argv(argv[0], _subparser(parser, command))])
        except OptionError as err:
            raise OptionError(f"{argv[0]}: {err}" if not str(err).startswith(argv[0]) else str(err)) from None
    return parser.parse_args([command, *argv])


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    raise OptionError(f"{command}: unknown command")


def add_hub_options(p: argparse.ArgumentParser, model: str = "MODEL", *, cache_dir_flag: bool = True) -> None:
    """``--revision`` (of the command's main model, ``model``) and ``--cache-dir`` / ``--hub-cache-dir`` (the
    Hugging Face cache every Hub id of the command is fetched into). The command's other model options take
    ``org/name@revision``: one revision cannot fit two repositories. ``cache_dir_flag`` False: only
    ``--hub-cache-dir`` (``trine mine``'s ``--cache_dir`` is its encodings cache)."""
    p.add_argument("--revision", default=None,
                   help=f"branch, tag or commit of {model} when it is a Hugging Face Hub id (also ID@REVISION; "
                        "the command's other model options take ID@REVISION)")
    flags = ("--cache-dir", "--hub-cache-dir") if cache_dir_flag else ("--hub-cache-dir",)
    p.add_argument(*flags, dest="hub_cache_dir", default=None,
                   help="Hugging Face cache for Hub ids (default: HF_HUB_CACHE, else HF_HOME/hub, else "
                        "~/.cache/huggingface/hub; HF_HUB_OFFLINE=1: the cache only)")


def resolve_model_options(args: argparse.Namespace, main: str, *others: str,
                          extra_files: dict[str, list[str]] | None = None) -> None:
    """Each model option of ``args`` (their ``dest`` names; ``main`` takes ``--revision``) as its local folder: a
    folder as it is, a Hub id fetched into the cache (:func:`trine.modeling.loading.resolve_model`), before the
    command checks its outputs or loads anything, so everything after sees folders. A list value (``--model``
    given several times) resolves each; ``extra_files``: files a Hub id of an option needs beyond the usual
    (``--gguf_file``). The names as given stay in ``args.model_references``."""
    from trine.modeling.loading import resolve_model

    references = getattr(args, "model_references", {})
    for dest in (main, *others):
        value = getattr(args, dest)
        if value is None:
            continue
        revision = args.revision if dest == main else None

        def one(v: str, dest: str = dest, revision: str | None = revision) -> str:
            return resolve_model(v, revision=revision, cache_dir=args.hub_cache_dir, what=dest,
                                 extra_files=(extra_files or {}).get(dest, ()))

        references[dest] = value
        setattr(args, dest, [one(v) for v in value] if isinstance(value, list) else one(value))
    args.model_references = references
