"""Typed options for the training commands: flags, or one YAML/JSON file, into dataclasses.

Every value is checked against the declared type of its dataclass field when it is read, the
same way for flags and files, so a bad value stops the command before anything is loaded or
written, with the option, the value and the expected type in the message:

- numbers: an ``int`` field takes an integer, a ``float`` field any number; a string that parses
  as the declared type is taken (YAML 1.1 reads ``1e-4`` as a string), any other string is an error;
- booleans take only true/false spellings (``true``/``false``, ``yes``/``no``, ``t``/``f``,
  ``y``/``n``, ``1``/``0``, any case), never an arbitrary string;
- ``resume_from_checkpoint`` (a boolean or a folder for Hugging Face's ``Trainer``): ``true`` means
  the newest checkpoint in ``output_dir``, ``false`` no resume (write ``./true`` for a folder so named);
- unknown, repeated or missing options are errors, each reported as ``path[:line]: option: message``;
- an option a dataclass refuses by name (its ``REFUSED_OPTIONS`` class attribute, name: why; e.g. FlagEmbedding's
  options trine has no equivalent of) is an error giving that reason, not "unknown option".
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from trine.errors import InputError, OptionError, UserError

TRUE_SPELLINGS = ("true", "yes", "t", "y", "1")
FALSE_SPELLINGS = ("false", "no", "f", "n", "0")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

# Options Hugging Face declares as a path but also takes as a boolean.
BOOL_OR_PATH_OPTIONS = ("resume_from_checkpoint",)
_BOOL_OR_PATH_TYPE = Union[bool, str, None]  # noqa: UP007 (a runtime type object)


class _Mismatch(Exception):
    """A value that does not fit a type (turned into an :class:`OptionError` naming the option)."""


# ---------------------------------------------------------------------------------------------- values
def parse_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean: a bool, 0/1, or a true/false spelling; anything else raises :class:`OptionError`."""
    try:
        return _to_bool(value)
    except _Mismatch:
        raise OptionError(f"{name}: expected {describe(bool)}, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_SPELLINGS:
            return True
        if word in FALSE_SPELLINGS:
            return False
    raise _Mismatch


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def describe(tp: Any) -> str:
    """A type in words, for messages: ``int`` -> "an integer", ``float | None`` -> "a number or null"."""
    if tp is bool:
        return "a boolean (true/false, yes/no, 1/0)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if _is_union(tp):
        parts = [describe(a) for a in get_args(tp) if a is not type(None)]
        if type(None) in get_args(tp):
            parts.append("null")
        return " or ".join(dict.fromkeys(parts))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_enum(tp):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    origin = get_origin(tp) or tp
    if isinstance(origin, type) and issubclass(origin, (list, tuple)):
        args = get_args(tp)
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if isinstance(origin, type) and issubclass(origin, dict):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(words: str) -> str:
    """"an integer" -> "integers" (the words of one item, for "a list of ...")."""
    for article in ("an ", "a "):
        if words.startswith(article):
            rest = words[len(article):]
            return rest + "s" if rest.isalpha() else rest
    return words


def _matches(value: Any, tp: Any) -> bool:
    """True when ``value`` already has type ``tp`` (no conversion needed), checked shallowly."""
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, float)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if get_origin(tp) is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    origin = get_origin(tp) or tp
    if isinstance(origin, type):
        if issubclass(origin, (list, tuple)):
            return isinstance(value, (list, tuple))
        return isinstance(value, origin)
    return False


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as declared type ``tp``, converting only what is unambiguous (see the module doc);
    raises ``_Mismatch`` otherwise."""
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        members = get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise _Mismatch
        members = [m for m in members if m is not type(None)]
        for m in members:  # a value that already has one of the types keeps it (True stays a bool in bool | str)
            if _matches(value, m):
                return coerce(value, m)
        for m in members:
            try:
                return coerce(value, m)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if get_origin(tp) is Literal:
        for a in get_args(tp):
            if value == a and type(value) is type(a):
                return a
        raise _Mismatch
    if tp is bool:
        return _to_bool(value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if math.isnan(number):
            raise _Mismatch
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a split named 2024
        raise _Mismatch
    if _is_enum(tp):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value:
                return member
        raise _Mismatch
    origin = get_origin(tp) or tp
    args = get_args(tp)
    if isinstance(origin, type) and issubclass(origin, (list, tuple)):
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # one value stands for a list of one
        if args and args[0] is not Ellipsis:
            items = [coerce(item, args[0]) for item in items]
        return items
    if isinstance(origin, type) and issubclass(origin, dict):
        if not isinstance(value, dict):
            raise _Mismatch
        if len(args) == 2:
            return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
        return value
    if isinstance(origin, type) and isinstance(value, origin):
        return value
    if isinstance(origin, type) and isinstance(value, dict):
        return value  # a structured option given as a mapping: its own class checks it
    raise _Mismatch


def bool_or_path(value: Any) -> bool | str | None:
    """``resume_from_checkpoint``: ``true`` -> True (the newest checkpoint), ``false`` -> None (no resume),
    anything else a folder."""
    if isinstance(value, bool):
        return True if value else None
    if isinstance(value, str) and value.strip().lower() in ("true", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no"):
        return None
    return value


# ---------------------------------------------------------------------------------------------- files
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such config file")
    if os.path.isdir(path):
        raise InputError(f"{path}: a folder, not a config file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: (file): not UTF-8: {err.reason} at byte {err.start}") from None


def read_config_file(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping in a YAML or JSON config file, and the line of each key (YAML; empty for JSON).

    A repeated key is an error (YAML and JSON loaders would silently keep the last one)."""
    text = _read_text(path)
    lines: dict[str, int] = {}
    if path.endswith(".json"):
        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in items:
                if key in seen:
                    raise InputError(f"{path}: {key}: given twice")
                seen[key] = value
            return seen

        try:
            data = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: (file): not valid JSON: {err.msg} at column {err.colno}") from None
    else:
        import yaml

        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            problem = getattr(err, "problem", None) or _first_line(err)
            raise InputError(f"{where}: (file): not valid YAML: {problem}") from None
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                if key in lines:
                    raise InputError(f"{path}:{key_node.start_mark.line + 1}: {key}: given twice "
                                     f"(first on line {lines[key]})")
                lines[key] = key_node.start_mark.line + 1
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: (file): a config file holds a mapping of option: value, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise InputError(f"{path}:{lines.get(key, '?')}: {key!r}: an option name must be a string")
    return data, lines


# ---------------------------------------------------------------------------------------------- parsing
# The one vocabulary of every command: each group's spellings are one option. A command that
# declares any of them accepts them all (the first is the name help and messages use); the value
# keeps the dest the command declared. Used by both parsers: trine.cli.parser's and Hugging Face's.
FLAG_ALIASES: tuple[tuple[str, ...], ...] = (
    ("--model", "--model_name_or_path"),
    ("--output-dir", "--output_dir", "--out"),
    ("--quiet", "--no-progress"),
    ("--heads", "--init_missing_heads"),
)


def other_spelling(flag: str) -> str:
    """``--query_max_len`` <-> ``--query-max-len`` (the part after the dashes)."""
    body = flag[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


def preferred_flag(flag: str, flags: Any) -> str:
    """The spelling help and messages use for ``flag``: its vocabulary group's first that ``flags`` has."""
    for group in FLAG_ALIASES:
        if flag in group or other_spelling(flag) in group:
            return next((g for g in group if g in flags), flag)
    return flag


# ``name=value`` in a library message: a quoted string (or a list of them: 'a', 'b' or 'c'), a boolean, a number
_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=('[^']*'(?:(?:, | or | and )'[^']*')*|True|False|-?\d[\d.e-]*)")


def command_line_words(message: str, flags: Any) -> str:
    """A library message in command-line words: ``init_missing_heads='random', 'neutral' or 'bm25'`` ->
    ``--heads random, neutral or bm25`` where ``--init_missing_heads`` is one of ``flags`` (the running
    command's); keyword names that are no flag of the command stay as they are (the Python API's words)."""
    flags = set(flags)

    def flag_words(found: re.Match) -> str:
        name, value = found.groups()
        flag = f"--{name}"
        if flag not in flags and other_spelling(flag) not in flags:
            return found.group(0)
        flag = preferred_flag(flag if flag in flags else other_spelling(flag), flags)
        if value == "True":
            return flag
        return f"{flag} {value.replace(chr(39), '') if value != 'False' else 'false'}"

    return _KEYWORD.sub(flag_words, message)


@functools.cache
def _parser_class() -> type:
    """Hugging Face's flag parser, its errors raised as :class:`OptionError` (not printed with the
    usage and ``sys.exit(2)``), with no abbreviated flags (``--learning`` is not ``--learning_rate``),
    and a help that lists trine's own options before the Trainer's. Built on first use: importing
    transformers costs seconds, which ``import trine`` and ``trine --help`` should not pay."""
    from transformers import HfArgumentParser, TrainingArguments

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}

    class _Parser(HfArgumentParser):
        def __init__(self, dataclass_types: Any, prog: str | None = None, description: str | None = None):
            # a one-line usage: argparse's own lists all ~150 flags before the summary
            super().__init__(dataclass_types, allow_abbrev=False, prog=prog, description=description,
                             usage="%(prog)s [options] | %(prog)s CONFIG.yaml",
                             epilog="--quiet (also --no-progress): no progress bars (trine's, Hugging Face's, "
                                    "the Trainer's); the command line takes it before these options are read.")
            self._add_vocabulary()
            self._group_trainer_options()
            _Parser.known_flags.update(self._option_string_actions)

        #: every flag a parser of this process declared (the running command's): error messages are
        #: put in these words (:func:`command_line_words`)
        known_flags: typing.ClassVar[set[str]] = set()

        def _add_vocabulary(self) -> None:
            """The shared spellings (:data:`FLAG_ALIASES`) as more names of the option a dataclass declares."""
            for group in FLAG_ALIASES:
                spellings = [*group, *(other_spelling(g) for g in group)]
                action = next((self._option_string_actions[f] for f in spellings if f in self._option_string_actions),
                              None)
                if action is None:
                    continue
                for flag in spellings:
                    if flag not in self._option_string_actions:
                        action.option_strings.append(flag)
                        self._option_string_actions[flag] = action

        def _group_trainer_options(self) -> None:
            """Help only: trine's options (model, data, trine's training fields) in one group, then
            ``transformers.TrainingArguments``' own in another. Parsing reads ``self._actions``, unchanged."""
            ours = self.add_argument_group("trine options")
            theirs = self.add_argument_group("Trainer options (transformers.TrainingArguments)")
            for group in list(self._action_groups):
                if group in (ours, theirs):
                    continue
                for action in list(group._group_actions):
                    if action.dest == "help":
                        continue
                    group._group_actions.remove(action)
                    (theirs if action.dest in trainer_fields else ours)._group_actions.append(action)

        def error(self, message: str) -> typing.NoReturn:  # argparse: bad value, missing or unknown flag
            raise OptionError(flag_message(message))

    return _Parser


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean --query_max_len?)`` for a mistyped command or flag, or ``""`` when nothing is close.
    The fewest edits win (a swapped pair of letters is one: ``--modle`` is ``--model``, not ``--modes``);
    difflib's similarity breaks ties and finds the rest."""
    choices = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(word, choices, n=len(choices), cutoff=0.6)
    near = sorted((c for c in choices if _edits(word, c) <= 2), key=lambda c: _edits(word, c))
    best = near[0] if near else (close[0] if close else None)
    return f" (did you mean {best}?)" if best else ""


def _edits(a: str, b: str) -> int:
    """Edit distance counting a swap of two neighbouring letters as one edit (optimal string alignment)."""
    rows = [list(range(len(b) + 1))] + [[i] + [0] * len(b) for i in range(1, len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[len(a)][len(b)]


_ARGPARSE_TYPES = {"int": int, "float": float}


def flag_message(message: str) -> str:
    """argparse's "argument --a/--b: invalid int value: 'x'" as trine's "--a: expected an integer, got 'x'"."""
    found = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: (.*)", message, re.S)
    if found is None:
        return message
    flag, rest = found.groups()
    bad_value = re.match(r"invalid (\w+) value: (.*)", rest, re.S)
    if bad_value and bad_value.group(1) in _ARGPARSE_TYPES:
        return f"{flag}: expected {describe(_ARGPARSE_TYPES[bad_value.group(1)])}, got {bad_value.group(2)}"
    bad_bool = re.match(r"Truthy value expected: got (.*) but expected", rest, re.S)
    if bad_bool:
        return f"{flag}: expected {describe(bool)}, got {bad_bool.group(1)!r}"
    return f"{flag}: {rest}"


def _declared_types(dtype: type) -> dict[str, Any]:
    """Each init field's declared type (read from the annotations, which Hugging Face's parser
    leaves alone; it rewrites ``Field.type`` to the one type its flag parses)."""
    hints = typing.get_type_hints(dtype)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(dtype) if f.init}


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _build(dtype: type, values: dict[str, Any], where: str) -> Any:
    """``dtype(**values)``, its own checks (``__post_init__``) reported as :class:`OptionError`."""
    try:
        return dtype(**values)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise OptionError(f"{where}{_first_line(err)}") from err


def _snake_keys(path: str, data: dict[str, Any], lines: dict[str, int]) -> tuple[dict[str, Any], dict[str, int]]:
    """Option names in either spelling (``query-max-len`` is ``query_max_len``); both at once is an error."""
    out: dict[str, Any] = {}
    where: dict[str, int] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in out:
            raise OptionError(f"{path}:{lines.get(key, '?')}: {key}: given twice (also as {name})")
        out[name] = value
        if key in lines:
            where[name] = lines[key]
    return out, where


def _refused(types_: tuple[type, ...]) -> dict[str, str]:
    """The options ``types_`` refuse by name (each dataclass's ``REFUSED_OPTIONS``: name -> why)."""
    refused: dict[str, str] = {}
    for dtype in types_:
        refused.update(getattr(dtype, "REFUSED_OPTIONS", {}))
    return refused


def _parse_file(path: str, types_: tuple[type, ...]) -> tuple[Any, ...]:
    data, lines = _snake_keys(path, *read_config_file(path))

    def at(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else path

    declared: list[dict[str, Any]] = [_declared_types(t) for t in types_]
    known = {name for d in declared for name in d}
    refused = _refused(types_)
    problems = [f"{at(key)}: {key}: {refused[key]}" if key in refused else
                f"{at(key)}: {key}: unknown option" + did_you_mean(key, known) for key in data if key not in known]
    values: list[dict[str, Any]] = []
    for dtype, fields in zip(types_, declared):
        mine: dict[str, Any] = {}
        for name, tp in fields.items():
            if name not in data:
                continue
            value = data[name]
            if name in BOOL_OR_PATH_OPTIONS:
                tp = _BOOL_OR_PATH_TYPE
            try:
                value = coerce(value, tp)
            except _Mismatch:
                problems.append(f"{at(name)}: {name}: expected {describe(tp)}, got {value!r}")
                continue
            mine[name] = bool_or_path(value) if name in BOOL_OR_PATH_OPTIONS else value
        for f in dataclasses.fields(dtype):
            if f.init and _required(f) and f.name not in data:
                problems.append(f"{path}: {f.name}: missing (a required option)")
        values.append(mine)
    if problems:
        raise OptionError("\n".join(dict.fromkeys(problems)))
    return tuple(_build(dtype, v, f"{path}: ") for dtype, v in zip(types_, values))


def _parse_flags(argv: list[str], types_: tuple[type, ...], prog: str | None = None,
                 description: str | None = None) -> tuple[Any, ...]:
    refused = _refused(types_)
    for arg in argv:
        name = arg[2:].partition("=")[0].replace("-", "_") if arg.startswith("--") else None
        if name in refused:
            raise OptionError(f"--{name}: {refused[name]}")
    parser = _parser_class()(types_, prog=prog, description=description)
    namespace, remaining = parser.parse_known_args(args=argv)
    if remaining:
        unknown = [a for a in remaining if a.startswith("-")] or remaining
        flags = [f for action in parser._actions for f in action.option_strings]
        raise OptionError(f"{unknown[0]}: unknown option" + did_you_mean(unknown[0].split("=", 1)[0], flags)
                          + (f" (also: {' '.join(unknown[1:])})" if unknown[1:] else "")
                          + f"; see `{parser.prog} --help`")
    outputs = []
    for dtype in types_:
        fields = _declared_types(dtype)
        mine = {k: v for k, v in vars(namespace).items() if k in fields}
        for name in BOOL_OR_PATH_OPTIONS:
            if name in mine:
                mine[name] = bool_or_path(mine[name])
        outputs.append(_build(dtype, mine, ""))
    return tuple(outputs)


def parse_config(argv: list[str], types: tuple[type, ...], *, prog: str | None = None,  # noqa: A002 (the public name)
                 description: str | None = None) -> tuple[Any, ...]:
    """Command-line flags, or one YAML/JSON config file, into instances of the dataclasses ``types``.

    Every value is checked against its field's declared type (module doc); unknown, repeated
    and missing options are errors. Raises :class:`OptionError` (bad options) or
    :class:`InputError` (an unreadable config file), both naming the file, line and option.
    ``prog`` and ``description`` head ``--help`` (``trine finetune`` and the command's summary).
    """
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        return _parse_file(argv[0], tuple(types))
    return _parse_flags(argv, tuple(types), prog, description)


__all__ = ["FLAG_ALIASES", "bool_or_path", "coerce", "command_line_words", "describe", "did_you_mean", "flag_message",
           "other_spelling", "parse_bool", "parse_config", "preferred_flag", "read_config_file"]
