"""Training records: FlagEmbedding's JSONL format, validated whole before anything trains.

A record is ``{"query": str, "pos": [str], "neg": [str], "pos_scores": [float],
"neg_scores": [float], "prompt": str, "type": str}`` (only ``query`` and ``pos`` are required).
Every problem in every file is collected and reported as ``file:line: field: message``
(:mod:`trine.data.reader`'s error policy).

Record types, with FlagEmbedding 1.4.2's meaning (they shape batches, so a file has one type and
any type but ``normal`` needs ``same_dataset_within_batch``, as in FlagEmbedding, which ignores
``type`` otherwise):

- ``normal``: 1 positive + ``train_group_size - 1`` negatives;
- ``only_1neg``: groups of 2 (1 positive, 1 negative) whatever ``train_group_size`` is;
- ``symmetric_class``: groups of ``min(negatives + 1, train_group_size)`` (the other labels);
- ``symmetric_sts`` / ``symmetric_clustering``: passages take the query's instruction (the
  record's ``prompt``, else the query instruction) instead of the passage instruction;
- every ``symmetric_*`` file without its own batch size trains at half the default batch size.

A file whose name (before ``.jsonl``/``.json``), or the ``train_data`` folder it is in, ends
with ``no_in_batch_neg`` trains without in-batch negatives (FlagEmbedding's naming convention;
``file_options`` wins).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from trine.data.corpus import list_data_files
from trine.data.reader import DataError, json_lines
from trine.data.text import text_problem

logger = logging.getLogger(__name__)

# ``category``: the label of a symmetric_clustering record (FlagEmbedding's in-context-learning
# model shows it as an example; trine keeps it on the record and trains nothing from it)
# ``generator``: how `trine generate-queries` made the record (model, prompt hash, options); provenance only
KNOWN_FIELDS = {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type", "batch_size", "category",
                "generator"}
SUPPORTED_TYPES = ("normal", "only_1neg", "symmetric_class", "symmetric_clustering", "symmetric_sts")
SYMMETRIC_PASSAGE_TYPES = ("symmetric_sts", "symmetric_clustering")  # passages take the query instruction
NO_IN_BATCH_NEG_SUFFIX = "no_in_batch_neg"


def type_group_size(kind: str, train_group_size: int, negatives: int) -> int:
    """FlagEmbedding's group size for a record type (``_get_train_group_size``): ``only_1neg`` 2,
    ``symmetric_class`` ``min(negatives + 1, train_group_size)``, every other type ``train_group_size``."""
    if kind == "only_1neg":
        return 2
    if kind == "symmetric_class":
        return min(negatives + 1, train_group_size)
    return train_group_size


@dataclass
class Record:
    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    line: int = 0
    kind: str = "normal"  # the record's ``type``
    category: str | None = None


@dataclass
class TrainFile:
    path: str
    records: list[Record]
    batch_size: int | None = None  # per-device batch size for this file
    in_batch_negatives: bool = True
    extra_passages: list[str] = field(default_factory=list)  # pool for filling missing negatives
    kind: str = "normal"  # the records' type (one per file)
    folder: str | None = None  # the train_data folder the file was found in (None: named itself)
    parts: list[TrainFile] = field(default_factory=list)  # small files merged into this one (small_threshold)

    def resolved_batch_size(self, default: int) -> int:
        """FlagEmbedding's per-file batch size: the file's own, else half the default for a
        ``symmetric_*`` file, else the default; merged small files take their parts' smallest."""
        if self.parts:
            return min(part.resolved_batch_size(default) for part in self.parts)
        if self.batch_size is not None:
            return self.batch_size
        if self.kind.startswith("symmetric"):
            return max(1, default // 2)
        return default


def _check_str_list(obj: dict, key: str, where: str, problems: list[str], required: bool) -> list[str] | None:
    if key not in obj:
        if required:
            problems.append(f"{where}: {key}: missing")
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        problems.append(f"{where}: {key}: must be a list of strings, got {type(value).__name__}")
        return None
    if required and not value:
        problems.append(f"{where}: {key}: empty")
        return None
    for i, x in enumerate(value):
        problem = text_problem(x)
        if problem:
            problems.append(f"{where}: {key}[{i}]: {problem}")
            return None
    return value


def _check_scores(obj: dict, key: str, n: int | None, where: str, problems: list[str]) -> list[float] | None:
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        problems.append(f"{where}: {key}: must be a list of numbers")
        return None
    if any(not math.isfinite(x) for x in value):
        problems.append(f"{where}: {key}: holds a non-finite number")
        return None
    if n is not None and len(value) != n:
        passages = "pos" if key == "pos_scores" else "neg"
        problems.append(f"{where}: {key}: {len(value)} scores for {n} {passages} passages")
        return None
    return [float(x) for x in value]


def read_file(path: str, problems: list[str]) -> tuple[list[Record], int | None]:
    """Parse one JSONL file, appending every problem found; returns records and a file batch size."""
    records: list[Record] = []
    batch_sizes: set[int] = set()
    kinds: dict[str, int] = {}  # type -> first line
    for number, obj in json_lines(path, problems):
        where = f"{path}:{number}"
        for key in sorted(set(obj) - KNOWN_FIELDS):
            problems.append(f"{where}: {key}: unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})")
        query = obj.get("query")
        if "query" not in obj:
            problems.append(f"{where}: query: missing")
        elif not isinstance(query, str):
            problems.append(f"{where}: query: must be a string, got {type(query).__name__}")
        elif text_problem(query):
            problems.append(f"{where}: query: {text_problem(query)}")
        pos = _check_str_list(obj, "pos", where, problems, required=True)
        neg = _check_str_list(obj, "neg", where, problems, required=False)
        pos_scores = _check_scores(obj, "pos_scores", len(pos) if pos is not None else None, where, problems)
        neg_scores = _check_scores(obj, "neg_scores", len(neg) if neg is not None else 0, where, problems)
        prompt = obj.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            problems.append(f"{where}: prompt: must be a string")
        kind = obj.get("type", "normal")
        if kind not in SUPPORTED_TYPES:
            problems.append(f"{where}: type: {kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        else:
            kinds.setdefault(kind, number)
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            problems.append(f"{where}: category: must be a string")
        if "batch_size" in obj:
            bs = obj["batch_size"]
            if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
                problems.append(f"{where}: batch_size: must be a positive integer")
            else:
                batch_sizes.add(bs)
        if isinstance(query, str) and query.strip() and pos is not None:
            records.append(Record(query, pos, neg or [], pos_scores, neg_scores, prompt, number,
                                  kind if kind in SUPPORTED_TYPES else "normal",
                                  category if isinstance(category, str) else None))
    if len(batch_sizes) > 1:
        problems.append(f"{path}: batch_size: records disagree ({sorted(batch_sizes)}); a file has one batch size")
    if len(kinds) > 1:  # named at the first line of another type than the file's first record
        (first, line), (other, at) = sorted(kinds.items(), key=lambda kv: kv[1])[:2]
        problems.append(f"{path}:{at}: type: {other!r} differs from {first!r} (line {line}); a file has one type "
                        "(its batches are of one type)")
    return records, (batch_sizes.pop() if len(batch_sizes) == 1 else None)


def load_train_files(
    paths: list[str],
    *,
    train_group_size: int,
    knowledge_distillation: bool = False,
    fill_missing_negatives: str = "error",
    file_options: dict[str, dict[str, Any]] | None = None,
) -> list[TrainFile]:
    """Read and validate every file; raise :class:`DataError` listing all problems."""
    if train_group_size < 1:
        raise ValueError(f"train_group_size must be >= 1, got {train_group_size}")
    if fill_missing_negatives not in ("error", "random"):
        raise ValueError(f"fill_missing_negatives must be 'error' or 'random', got {fill_missing_negatives!r}")
    options = {os.path.abspath(k): dict(v) for k, v in (file_options or {}).items()}
    problems: list[str] = []
    files = []
    for path, folder in _data_files(paths):
        records, file_bs = read_file(path, problems)
        kind = records[0].kind if records else "normal"
        opts = options.pop(os.path.abspath(path), {})
        unknown = set(opts) - {"batch_size", "in_batch_negatives"}
        if unknown:
            problems.append(f"{path}: file options: unknown {sorted(unknown)} (known: batch_size, in_batch_negatives)")
        short = []
        for r in records:
            where = f"{path}:{r.line}"
            need = type_group_size(r.kind, train_group_size, len(r.neg)) - 1
            if knowledge_distillation:
                if r.pos_scores is None:
                    problems.append(f"{where}: pos_scores: missing (knowledge_distillation is on)")
                if need and r.neg_scores is None:
                    problems.append(f"{where}: neg_scores: missing (knowledge_distillation is on)")
            if need and len(r.neg) < need:
                short.append(r)
                if fill_missing_negatives == "error":
                    group = f"type {r.kind!r} groups of {need + 1}" if r.kind != "normal" else \
                        f"train_group_size {train_group_size}"
                    problems.append(
                        f"{where}: neg: {len(r.neg)} negatives, {group} needs {need} "
                        "(set fill_missing_negatives='random' to fill from other records)"
                    )
        if fill_missing_negatives == "random" and knowledge_distillation and short:
            problems.append(f"{path}:{short[0].line}: neg: filling negatives cannot give teacher scores")
        if not records and not any(p.startswith(path + ":") for p in problems):
            problems.append(f"{path}: no records")
        bs = opts.get("batch_size", file_bs)
        in_batch = opts.get("in_batch_negatives", not _no_in_batch_neg_name(path, folder))
        files.append(TrainFile(path, records, bs, bool(in_batch), kind=kind, folder=folder))
    for leftover in options:
        problems.append(f"{leftover}: file options given for a file that is not in train_data")
    if problems:
        raise DataError(problems)
    return files


def _data_files(paths: list[str]) -> list[tuple[str, str | None]]:
    """Each training file with the ``train_data`` folder it was found in (None: named itself)."""
    out = []
    for p in paths:
        folder = p if os.path.isdir(p) else None
        out += [(f, folder) for f in list_data_files([p])]
    return out


def _no_in_batch_neg_name(path: str, folder: str | None) -> bool:
    """FlagEmbedding's convention: a file (its name before the extension) or a ``train_data``
    folder whose name ends with ``no_in_batch_neg`` trains without in-batch negatives."""
    stem = os.path.basename(path).rsplit(".", 1)[0]
    return stem.endswith(NO_IN_BATCH_NEG_SUFFIX) or (
        folder is not None and os.path.basename(os.path.normpath(folder)).endswith(NO_IN_BATCH_NEG_SUFFIX))


def apply_dataset_options(
    files: list[TrainFile],
    *,
    max_example_num_per_dataset: int | None = None,
    small_threshold: int = 0,
    drop_threshold: int = 0,
    seed: int = 42,
) -> list[TrainFile]:
    """FlagEmbedding's per-file data options, in its order (``AbsEmbedderSameDatasetTrainDataset``):

    1. ``max_example_num_per_dataset``: a file with more records keeps a seeded sample of that
       many, in the sample's order: ``random.Random(seed).sample(range(n), k)``, one generator
       drawn file after file (FlagEmbedding draws ``random.sample`` from the global generator
       that ``set_seed(seed)`` seeded, so the first capped file keeps the same rows);
    2. ``small_threshold``: the files of one ``train_data`` folder with fewer records are merged
       into one dataset (batches mix them; batch size the smallest of theirs), kept only if the
       merge holds at least ``drop_threshold`` records; a file named on its own with fewer records
       than ``small_threshold`` is left out (both logged).

    Merged files must agree in type and in-batch negatives (:class:`DataError` otherwise).
    """
    if max_example_num_per_dataset is not None and max_example_num_per_dataset < 1:
        raise ValueError(f"max_example_num_per_dataset must be >= 1, got {max_example_num_per_dataset}")
    if small_threshold < 0 or drop_threshold < 0:
        raise ValueError("small_threshold and drop_threshold must be >= 0")
    rng = random.Random(seed)
    capped = []
    for f in files:
        if max_example_num_per_dataset is not None and len(f.records) > max_example_num_per_dataset:
            keep = rng.sample(range(len(f.records)), max_example_num_per_dataset)
            logger.info("%s: %d of %d records (max_example_num_per_dataset)", f.path, len(keep), len(f.records))
            f = replace(f, records=[f.records[i] for i in keep])
        capped.append(f)
    if not small_threshold:
        return capped
    out: list[TrainFile] = []
    small: dict[str, list[TrainFile]] = {}
    for f in capped:
        if len(f.records) >= small_threshold:
            out.append(f)
        elif f.folder is None:
            logger.warning("%s: left out: %d records, fewer than small_threshold %d (FlagEmbedding's rule for "
                           "a file named on its own)", f.path, len(f.records), small_threshold)
        else:
            small.setdefault(f.folder, []).append(f)
    problems = []
    for folder, parts in small.items():
        names = ", ".join(os.path.basename(p.path) for p in parts)
        size = sum(len(p.records) for p in parts)
        if size < drop_threshold:
            logger.warning("%s: small files %s left out: %d records together, fewer than drop_threshold %d",
                           folder, names, size, drop_threshold)
            continue
        kinds = sorted({p.kind for p in parts})
        if len(kinds) > 1:
            problems.append(f"{folder}: type: small files merged by small_threshold disagree ({names}: {kinds}); "
                            "a merged dataset has one type")
            continue
        flags = {p.in_batch_negatives for p in parts}
        if len(flags) > 1:
            problems.append(f"{folder}: in_batch_negatives: small files merged by small_threshold disagree ({names})")
            continue
        logger.info("%s: merged %d small files (%s): %d records", folder, len(parts), names, size)
        out.append(TrainFile(f"{folder} (merged small files: {names})", [r for p in parts for r in p.records],
                             None, flags.pop(), [t for p in parts for t in p.extra_passages], kind=kinds[0],
                             folder=folder, parts=parts))
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError([f"{', '.join(sorted({f.path for f in files}))}: no training data left: every file has "
                         f"fewer records than small_threshold {small_threshold} and their merge fewer than "
                         f"drop_threshold {drop_threshold}"])
    return out


def read_records(path: str) -> list[Record]:
    """Every record of a training file, validated; every problem raised at once as file:line: field."""
    problems: list[str] = []
    records = read_file(path, problems)[0]
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{path}: no records"])
    return records


def iter_raw_rows(path: str) -> Iterator[dict[str, Any]]:
    """The file's JSON objects in order (blank lines skipped, as ``read_file`` does), one at a time.

    Used after :func:`read_records` validated the file, so that output rows keep every field of
    their input row without holding the whole file twice.
    """
    for _, obj in json_lines(path):
        yield obj
