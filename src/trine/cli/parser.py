"""The one option parser of the argparse commands: both spellings, typed errors, config files.

- Every ``--snake_case`` flag is also accepted as ``--kebab-case`` and the other way round
  (Hugging Face's parser does the same for the training commands).
- A bad value, an unknown or a missing option raises :class:`~trine.errors.OptionError` (exit 2
  through the command line's one policy) instead of printing the usage.
- ``trine <command> FILE.yaml`` (or ``.yml`` / ``.json``, the file as the only argument) reads the
  options from a mapping of option: value, checked as the flags would be, errors naming the file
  and line: the same as ``trine finetune FILE.yaml``.
- One vocabulary on every command (:data:`FLAG_ALIASES`): a command that defines any spelling of
  ``--model``, ``--output-dir``, ``--quiet`` or ``--heads`` accepts all of them; a positional
  ``model`` is also ``--model`` (and ``out`` ``--output-dir``). The aliases are added here, once,
  not at every ``add_argument``.
- A mistyped command or flag gets "did you mean ...?"; help shows each option's default, and an
  option declared without help gets the shared text of :data:`OPTION_HELP`.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from typing import Any

from trine.config import (  # noqa: F401 (FLAG_ALIASES and other_spelling re-exported for the commands)
    CONFIG_SUFFIXES,
    FLAG_ALIASES,
    did_you_mean,
    flag_message,
    other_spelling,
    parse_bool,
    read_config_file,
)
from trine.errors import OptionError, options_checked  # noqa: F401 (re-exported for the commands)

# Positional arguments that are also flags (``trine encode MODEL`` or ``trine encode --model MODEL``).
POSITIONAL_FLAGS = {"model": "--model", "out": "--output-dir"}
# Help for options the commands share, where one was declared without (keyed by dest).
OPTION_HELP = {
    "batch_size": "texts (or pairs) per forward pass",
    "bf16": "run the model in bfloat16",
    "colbert_search": "rerank: ColBERT re-scores the dense candidates; full: the multi-vector index's own search "
                      "(exhaustive with --colbert-index exact, PLAID candidates with plaid)",
    "dense_index": "flat: exact search; hnsw / ivf: approximate FAISS indexes",
    "ef_search": "HNSW search depth (FAISS efSearch; default: FAISS's)",
    "filter_batch_size": "pairs per forward pass of the reference model",
    "filter_model_type": "the reference embedder's kind: dense, or m3 (three outputs)",
    "filter_passage_max_len": "reference model's passage length in tokens",
    "fp16": "run the model in float16",
    "hnsw_m": "HNSW graph degree (FAISS M); set: an approximate HNSW index instead of exact search",
    "host": "address to listen on",
    "ignore_identical_ids": "drop hits whose passage id equals the query id (BEIR's convention for some sets)",
    "input_file": "training JSONL file (FlagEmbedding's query/pos/neg records)",
    "k": "hits per query",
    "layout": "test-set layout: beir (corpus/queries/qrels), custom (FlagEmbedding's), auto: detected",
    "log_level": "logging level (DEBUG also shows the traceback of a user's mistake)",
    "max_new_tokens": "most tokens generated per reply",
    "mode": "score mode to search with",
    "negative_number": "negatives kept per query",
    "nlist": "IVF cells (FAISS nlist); set: an approximate IVF index instead of exact search",
    "nprobe": "IVF cells searched per query (FAISS nprobe)",
    "output_dir": "folder to write (a new one, or one trine wrote, with --overwrite)",
    "passage_instruction_format": "how a passage instruction and the passage are joined (two {} slots)",
    "passage_max_len": "passage length in tokens (longer ones are truncated)",
    "port": "TCP port to listen on",
    "query_instruction_for_retrieval": "instruction put before each query",
    "query_instruction_format": "how the query instruction and the query are joined (two {} slots)",
    "query_max_len": "query length in tokens (longer ones are truncated)",
    "reference_length": "the token length --reference_batch fits at",
    "reranker_max_len": "cross-encoder pair length in tokens",
    "score_mode": "which score ranks (modes other than dense need an M3 model)",
    "seed": "random seed (sampling is reproducible with the same seed)",
    "split": "test-set split to evaluate (its qrels file)",
    "test_fraction": "share of the pages that become test queries",
    "to": "export format",
    "top_p": "nucleus-sampling probability mass",
}


def device_list(text: str) -> str | list[str]:
    """``--devices cuda:0,cuda:1``: several devices comma-separated (one stays a string)."""
    items = [d.strip() for d in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated devices (cpu, cuda:0, ...), got {text!r}")
    return items[0] if len(items) == 1 else items


class DevicesAction(argparse.Action):
    """``--devices cuda:0,cuda:1`` or FlagEmbedding's ``--devices cuda:0 cuda:1`` (several: a list)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = [d for v in values for d in ([v] if isinstance(v, str) else v)]
        setattr(namespace, self.dest, items[0] if len(items) == 1 else items)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults-in-help, without the noise of ``(default: None)`` and ``(default: False)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action) or ""


class TrineArgumentParser(argparse.ArgumentParser):
    """argparse with both flag spellings, the shared vocabulary, no abbreviations, defaults in help,
    "did you mean" on a typo, and errors raised as OptionError."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._positional_flags: list[tuple[str, str]] = []  # (positional dest, its flag's dest)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        if len(names) == 1 and names[0] in POSITIONAL_FLAGS and not kwargs.get("nargs"):
            return self._positional_or_flag(names[0], **kwargs)
        if "--devices" in names:  # comma-separated on every command (a space-separated list where one was)
            kwargs["type"] = device_list
        spelled = list(names)
        for name in names:
            for group in FLAG_ALIASES:
                if name in group:
                    spelled += [g for g in group if g not in spelled and g not in self._option_string_actions]
        for name in list(spelled):
            if name.startswith("--"):
                alt = other_spelling(name)
                if alt not in spelled and alt not in self._option_string_actions:
                    spelled.append(alt)
        if not kwargs.get("help") and kwargs.get("help") is not argparse.SUPPRESS:
            dest = kwargs.get("dest") or next((n for n in names if n.startswith("--")), names[0]).lstrip("-")
            if dest.replace("-", "_") in OPTION_HELP:
                kwargs["help"] = OPTION_HELP[dest.replace("-", "_")]
        return super().add_argument(*spelled, **kwargs)

    def _positional_or_flag(self, dest: str, **kwargs: Any) -> argparse.Action:
        """``dest`` as the positional it was, optional, and as ``--model`` (and its aliases); one of
        the two is required (checked after parsing, by :meth:`parse_known_args`)."""
        kwargs.pop("required", None)
        action = super().add_argument(dest, nargs="?", default=None, **kwargs)
        flag_dest = f"{dest}_flag"
        self.add_argument(POSITIONAL_FLAGS[dest], dest=flag_dest, default=None, metavar=dest.upper(),
                          help=f"the same as the positional {dest}")
        self._positional_flags.append((dest, flag_dest))
        return action

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self._check_flags(sys.argv[1:] if args is None else list(args))
        ns, extras = super().parse_known_args(args, namespace)
        # argparse fills optional positionals from the left: with ``--model M`` given, a lone positional
        # word is the next one's (``trine export --model M OUT``), so values are dealt out in order
        words = [getattr(ns, dest) for dest, _ in self._positional_flags if getattr(ns, dest, None) is not None]
        for dest, flag_dest in self._positional_flags:
            flag = getattr(ns, flag_dest, None)
            delattr(ns, flag_dest)
            if flag is not None:
                setattr(ns, dest, flag)
            elif words:
                setattr(ns, dest, words.pop(0))
            else:
                self.error(f"the following arguments are required: {dest} (or {POSITIONAL_FLAGS[dest]})")
        if words:
            given = [f"{POSITIONAL_FLAGS[d]} {getattr(ns, d)}" for d, _ in self._positional_flags]
            self.error(f"{' '.join(map(str, words))}: one positional word too many (given: {', '.join(given)})")
        return ns, extras

    def _check_flags(self, args: list[str]) -> None:
        """An unknown flag of a command is reported first, with a suggestion (argparse would report a
        missing required option instead, and the typo only after that was fixed)."""
        if any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            # only the flags before the command are this parser's; the command's parser checks the rest
            args = args[:1] if args and args[0].startswith("--") else []
        for word in args:
            if word == "--":
                break
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in self._option_string_actions:
                self.error(f"unrecognized arguments: {flag}")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message: str) -> typing.NoReturn:
        raise OptionError(self._with_suggestion(flag_message(message)) + f" (see `{self.prog} --help`)")

    def _with_suggestion(self, message: str) -> str:
        """argparse's messages with a "did you mean": a mistyped command (among this parser's commands)
        or flag (among this parser's flags, both spellings and aliases)."""
        bad_choice = re.match(r"argument .*?: invalid choice: '([^']*)' \(choose from .*\)$", message, re.S)
        if bad_choice:
            word = bad_choice.group(1)
            commands = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
            if commands:
                return f"{word}: unknown command" + did_you_mean(word, commands) + f"; commands: {', '.join(commands)}"
            return message
        unknown = re.match(r"unrecognized arguments: (.*)$", message, re.S)
        if unknown:
            words = unknown.group(1).split()
            flag = next((w for w in words if w.startswith("-")), words[0]).split("=", 1)[0]
            return f"{flag}: unknown option" + did_you_mean(flag, self._option_string_actions) + (
                f" (also: {' '.join(w for w in words if w.split('=', 1)[0] != flag)})" if len(words) > 1 else "")
        bad_value = re.match(r"(--[\w-]+): invalid choice: '([^']*)' \(choose from (.*)\)$", message, re.S)
        if bad_value:  # an option's value: "--heads: invalid choice: 'bm52' (choose from ...) (did you mean bm25?)"
            choices = [c.strip().strip("'") for c in bad_value.group(3).split(",")]
            return message + did_you_mean(bad_value.group(2), choices)
        return message


PLAID_FLAGS = ("nbits", "pq_bytes", "opq", "pool_factor", "ncentroids", "nprobe", "ncandidates", "interaction_factor")


def add_colbert_index_options(p: argparse.ArgumentParser, default: str | None = "exact", *, nprobe: bool = True,
                              help: str | None = None) -> None:
    """``--colbert-index exact|plaid`` and the plaid index's options (trine.retrieval.plaid; defaults there).
    ``nprobe=False``: the command has its own ``--nprobe`` (`trine mine`'s, shared with its IVF index)."""
    p.add_argument("--colbert-index", default=default, choices=["exact", "plaid"],
                   help=help or "the multi-vector (colbert) index: exact (the vectors as they are, exact maxsim) or "
                        "plaid (compressed: centroid + a residual of --nbits per dimension or --pq-bytes per token, "
                        "its own candidate generation)")
    p.add_argument("--nbits", type=int, default=None, help="plaid: residual bits per dimension, 1, 2 or 4 (default 2)")
    p.add_argument("--pq-bytes", dest="pq_bytes", type=int, default=None,
                   help="plaid: product-quantise the residual into this many bytes per token instead of --nbits "
                        "(one byte per dim/pq-bytes dimensions; must divide the dim)")
    p.add_argument("--opq", dest="opq", action="store_const", const=True, default=None,
                   help="plaid: rotate the residual (OPQ, learned) before product quantisation (default with "
                        "--pq-bytes)")
    p.add_argument("--no-opq", dest="opq", action="store_const", const=False, default=None,
                   help="plaid: plain product quantisation, no rotation")
    p.add_argument("--pool-factor", dest="pool_factor", type=int, default=None,
                   help="plaid: merge each passage's similar token vectors (hierarchical clustering) into "
                        "tokens/pool-factor vectors before compressing (default 1: none)")
    p.add_argument("--ncentroids", type=int, default=None,
                   help="plaid: k-means centroids (default 2^floor(log2(4 sqrt(tokens))))")
    if nprobe:
        p.add_argument("--nprobe", type=int, default=None, help="plaid: centroids probed per query token (default 8)")
    p.add_argument("--ncandidates", type=int, default=None,
                   help="plaid: documents decompressed and scored exactly per query (default 256)")
    p.add_argument("--interaction-factor", dest="interaction_factor", type=int, default=None,
                   help="plaid: this many times --ncandidates documents get the full centroid interaction (all their "
                        "tokens' centroids) before the decompression (default 1: none)")


def colbert_index_options(args: argparse.Namespace) -> dict[str, int | bool]:
    """The plaid options given on the command line; refused unless ``--colbert-index plaid``."""
    given = {name: getattr(args, name) for name in PLAID_FLAGS if getattr(args, name) is not None}
    if given and args.colbert_index != "plaid":
        raise OptionError(f"--{' --'.join(n.replace('_', '-') for n in given)}: options of --colbert-index plaid "
                          f"(the index is {args.colbert_index})")
    return given


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
            problems.append(f"{at(key)}: {key}: unknown option" + did_you_mean(name, by_name))
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
    args, extras = parser.parse_known_args([command, *argv])
    if extras:  # argparse reports them at the top; the command's own flags give the suggestion
        sub = _subparser(parser, command)
        (sub if isinstance(sub, TrineArgumentParser) else parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


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
