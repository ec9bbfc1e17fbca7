"""Training records: FlagEmbedding's JSONL format, validated whole before anything trains.

A record is ``{"query": str, "pos": [str], "neg": [str], "pos_scores": [float],
"neg_scores": [float], "prompt": str, "type": str}`` (only ``query`` and ``pos`` are required).
Every problem in every file is collected and reported as ``file:line: field: message``
(:mod:`trine.data.reader`'s error policy).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from trine.data.corpus import list_data_files
from trine.data.reader import DataError, json_lines

KNOWN_FIELDS = {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type", "batch_size"}
SUPPORTED_TYPES = {"normal"}


@dataclass
class Record:
    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None
    line: int = 0


@dataclass
class TrainFile:
    path: str
    records: list[Record]
    batch_size: int | None = None  # per-device batch size for this file
    in_batch_negatives: bool = True
    extra_passages: list[str] = field(default_factory=list)  # pool for filling missing negatives


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
    if any(not x.strip() for x in value):
        problems.append(f"{where}: {key}: holds an empty string")
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
    for number, obj in json_lines(path, problems):
        where = f"{path}:{number}"
        for key in sorted(set(obj) - KNOWN_FIELDS):
            problems.append(f"{where}: {key}: unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})")
        query = obj.get("query")
        if "query" not in obj:
            problems.append(f"{where}: query: missing")
        elif not isinstance(query, str):
            problems.append(f"{where}: query: must be a string, got {type(query).__name__}")
        elif not query.strip():
            problems.append(f"{where}: query: empty")
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
        if "batch_size" in obj:
            bs = obj["batch_size"]
            if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
                problems.append(f"{where}: batch_size: must be a positive integer")
            else:
                batch_sizes.add(bs)
        if isinstance(query, str) and query.strip() and pos is not None:
            records.append(Record(query, pos, neg or [], pos_scores, neg_scores, prompt, number))
    if len(batch_sizes) > 1:
        problems.append(f"{path}: batch_size: records disagree ({sorted(batch_sizes)}); a file has one batch size")
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
    for path in list_data_files(paths):
        records, file_bs = read_file(path, problems)
        opts = options.pop(os.path.abspath(path), {})
        unknown = set(opts) - {"batch_size", "in_batch_negatives"}
        if unknown:
            problems.append(f"{path}: file options: unknown {sorted(unknown)} (known: batch_size, in_batch_negatives)")
        need = train_group_size - 1
        for r in records:
            where = f"{path}:{r.line}"
            if knowledge_distillation:
                if r.pos_scores is None:
                    problems.append(f"{where}: pos_scores: missing (knowledge_distillation is on)")
                if need and r.neg_scores is None:
                    problems.append(f"{where}: neg_scores: missing (knowledge_distillation is on)")
            if need and len(r.neg) < need and fill_missing_negatives == "error":
                problems.append(
                    f"{where}: neg: {len(r.neg)} negatives, train_group_size {train_group_size} needs {need} "
                    "(set fill_missing_negatives='random' to fill from other records)"
                )
        if need and fill_missing_negatives == "random" and knowledge_distillation:
            short = [r for r in records if len(r.neg) < need]
            if short:
                problems.append(f"{path}:{short[0].line}: neg: filling negatives cannot give teacher scores")
        if not records and not any(p.startswith(path + ":") for p in problems):
            problems.append(f"{path}: no records")
        bs = opts.get("batch_size", file_bs)
        files.append(TrainFile(path, records, bs, bool(opts.get("in_batch_negatives", True))))
    for leftover in options:
        problems.append(f"{leftover}: file options given for a file that is not in train_data")
    if problems:
        raise DataError(problems)
    return files


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
