"""Training data: FlagEmbedding's JSONL format, validated whole before anything trains.

A record is ``{"query": str, "pos": [str], "neg": [str], "pos_scores": [float],
"neg_scores": [float], "prompt": str, "type": str}`` (only ``query`` and ``pos`` are required).
Every problem in every file is collected and reported as ``file:line: field: message``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trine.errors import UserError
from trine.textfiles import not_utf8, open_text

KNOWN_FIELDS = {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt", "type", "batch_size"}
SUPPORTED_TYPES = {"normal"}


class DataError(UserError):
    """Bad training data; ``problems`` lists every ``file:line: field: message``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:  # one problem, one line: file:line: field: message
            super().__init__(problems[0])
            return
        shown = problems[:50]
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problems in the data:\n" + "\n".join(shown) + more)


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


def list_data_files(paths: list[str]) -> list[str]:
    """Expand folders into their .jsonl/.json files (sorted); every path must exist."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, f) for f in os.listdir(p) if f.endswith((".jsonl", ".json")) and not f.startswith(".")
            )
            if not found:
                raise DataError([f"{p}: folder holds no .jsonl or .json file"])
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError([f"{p}: no such file or folder"])
    return files


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
    try:
        handle = open_text(path)
    except OSError as err:
        problems.append(f"{path}: cannot open: {err.strerror or err}")
        return records, None
    with handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            bad = not_utf8(line)
            if bad:
                problems.append(f"{where}: (line): {bad}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: (line): not valid JSON: {err.msg} at column {err.colno}")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{where}: (line): a record must be a JSON object")
                continue
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


@dataclass
class Example:
    """One query with its sampled group: ``passages[0]`` is the positive."""

    query: str
    passages: list[str]
    teacher_scores: list[float] | None
    prompt: str | None


def sample_group(
    record: Record, group_size: int, rng: np.random.Generator, fill_pool: list[str] | None
) -> Example:
    """One positive and ``group_size - 1`` negatives from the record's pools (resampled every epoch)."""
    p = int(rng.integers(len(record.pos)))
    passages = [record.pos[p]]
    scores = [record.pos_scores[p]] if record.pos_scores is not None else None
    need = group_size - 1
    if need:
        if len(record.neg) >= need:
            picks = rng.choice(len(record.neg), size=need, replace=False)
            passages += [record.neg[i] for i in picks]
            if scores is not None and record.neg_scores is not None:
                scores += [record.neg_scores[i] for i in picks]
        else:
            passages += list(record.neg)
            own = set(record.pos) | set(record.neg) | {record.query}
            tries = 0
            while len(passages) < group_size:
                tries += 1
                if not fill_pool or tries > 100 * group_size:
                    raise DataError([f"line {record.line}: neg: too few other passages to fill negatives from"])
                cand = fill_pool[int(rng.integers(len(fill_pool)))]
                if cand not in own:
                    passages.append(cand)
                    own.add(cand)
    return Example(record.query, passages, scores if scores is not None and len(scores) == group_size else None,
                   record.prompt)


def parse_text_line(
    raw: bytes, allowed_fields: set[str] | None = None, record_name: str = "record"
) -> tuple[str | None, str | None]:
    """One line of a ``{"text": ...}`` JSONL file (pre-training corpora, candidate pools):
    ``(text, None)`` for a good line, ``(None, "field: message")`` for a bad one, ``(None, None)``
    for a blank one. ``allowed_fields``: the only keys a record may have (``None``: any)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"(line): not UTF-8: {err.reason} at byte {err.start}"
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"(line): not valid JSON: {err.msg} at column {err.colno}"
    if not isinstance(obj, dict):
        return None, "(line): a record must be a JSON object"
    if allowed_fields is not None:
        unknown = sorted(set(obj) - allowed_fields)
        if unknown:
            return None, f"{unknown[0]}: unknown field (a {record_name} is {{\"text\": ...}})"
    if "text" not in obj:
        return None, "text: missing"
    text = obj["text"]
    if not isinstance(text, str):
        return None, f"text: must be a string, got {type(text).__name__}"
    if not text.strip():
        return None, "text: empty"
    return text, None
