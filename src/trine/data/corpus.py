"""Text corpora: JSONL files of ``{"text": str}`` (pre-training corpora, mining candidate pools),
and the data folders every command accepts in place of a list of files.

Read with :mod:`trine.data.reader` (one reader, one error policy): every problem is
``file:line: field: message``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from trine.data.reader import DataError, json_lines, json_object, not_utf8, report
from trine.data.text import text_problem


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


def text_of(obj: dict[str, Any], allowed_fields: set[str] | None = None, record_name: str = "record"
            ) -> tuple[str | None, str | None]:
    """The text of one ``{"text": ...}`` record: ``(text, None)``, or ``(None, "field: message")``.
    ``allowed_fields``: the only keys a record may have (``None``: any)."""
    if allowed_fields is not None:
        unknown = sorted(set(obj) - allowed_fields)
        if unknown:
            return None, f"{unknown[0]}: unknown field (a {record_name} is {{\"text\": ...}})"
    if "text" not in obj:
        return None, "text: missing"
    text = obj["text"]
    if not isinstance(text, str):
        return None, f"text: must be a string, got {type(text).__name__}"
    problem = text_problem(text)
    if problem:
        return None, f"text: {problem}"
    return text, None


def parse_text_line(
    raw: bytes | str, allowed_fields: set[str] | None = None, record_name: str = "record"
) -> tuple[str | None, str | None]:
    """One line of a ``{"text": ...}`` JSONL file: ``(text, None)`` for a good line, ``(None,
    "field: message")`` for a bad one, ``(None, None)`` for a blank one."""
    line = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    if not line.strip():
        return None, None
    bad = not_utf8(line)
    if bad:
        return None, f"(line): {bad}"
    obj, problem = json_object(line)
    if problem:
        return None, problem
    return text_of(obj, allowed_fields, record_name)


def iter_texts(path: str, problems: list[str] | None = None, *, allowed_fields: set[str] | None = None,
               record_name: str = "record") -> Iterator[str]:
    """The texts of one corpus file, streamed; a bad line is a problem (appended to ``problems``,
    or raised at the first without a list: :mod:`trine.data.reader`'s error policy)."""
    for number, obj in json_lines(path, problems):
        text, problem = text_of(obj, allowed_fields, record_name)
        if problem:
            report(f"{path}:{number}: {problem}", problems)
            continue
        yield text


def scan_texts(paths: list[str], *, allowed_fields: set[str] | None = None, record_name: str = "record"
               ) -> tuple[list[str], int]:
    """Check every line of every file (folders expanded) in one streaming pass, holding no text;
    return the files and their number of texts. Raises :class:`DataError` listing every problem."""
    problems: list[str] = []
    files = list_data_files(paths)
    total = 0
    for path in files:
        seen = len(problems)
        count = sum(1 for _ in iter_texts(path, problems, allowed_fields=allowed_fields, record_name=record_name))
        if count == 0 and len(problems) == seen:
            problems.append(f"{path}: no records")
        total += count
    if problems:
        raise DataError(problems)
    return files, total


def read_pool(path: str) -> list[str]:
    """A candidate pool: JSONL of {"text": str} (other fields ignored), every text in file order;
    every problem raised at once as file:line: field."""
    problems: list[str] = []
    texts = list(iter_texts(path, problems))
    if problems:
        raise DataError(problems)
    if not texts:
        raise DataError([f"{path}: no candidate passages"])
    return texts
