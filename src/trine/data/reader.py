"""The one reader of a user's text files (training data, corpora, candidate pools, test sets) and its
error policy.

Files are UTF-8 (a leading byte-order mark is skipped), read line by line, numbered from 1; blank
lines are skipped. A byte that is not UTF-8 does not stop the reading with a traceback: it is a
problem of its line. A problem is one line of text, ``file:line: field: message`` (``file:
message`` for the whole file; the field is ``(line)`` when the line itself is bad).

Error policy: a reader given a ``problems`` list appends every problem to it and reads on, and the
caller raises :class:`DataError` with all of them once every file is read (one run names every
problem; nothing trains on bad data). A reader given no list raises :class:`DataError` at the
first problem: for streams over data checked before, and for test sets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

from trine.errors import UserError

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as ``surrogateescape`` reads them


class DataError(UserError):
    """Bad data; ``problems`` lists every ``file:line: field: message``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:  # one problem, one line: file:line: field: message
            super().__init__(problems[0])
            return
        shown = problems[:50]
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problems in the data:\n" + "\n".join(shown) + more)


def report(problem: str, problems: list[str] | None) -> None:
    """The error policy: append ``problem`` to ``problems``, or raise it when there is no list."""
    if problems is None:
        raise DataError([problem])
    problems.append(problem)


def open_text(path: str) -> TextIO:
    """A UTF-8 text file (a leading byte-order mark skipped), read line by line; a byte that is not
    UTF-8 does not stop the reading: :func:`not_utf8` finds it in its line."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def not_utf8(line: str) -> str | None:
    """For a line read with :func:`open_text`: ``"not UTF-8: ..."`` naming the first bad byte, or None."""
    found = _UNDECODABLE.search(line)
    if found is None:
        return None
    return f"not UTF-8: byte 0x{ord(found.group()) - 0xDC00:02x} at column {found.start() + 1}"


def text_lines(path: str, problems: list[str] | None = None, *, line_field: str | None = "(line)"
               ) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every non-blank UTF-8 line of ``path``. A file that cannot be
    opened and a line that is not UTF-8 are problems (see the module's error policy); ``line_field``
    names the field of a bad line in its problem (None: no field)."""
    try:
        handle = open_text(path)
    except OSError as err:
        report(f"{path}: cannot open: {err.strerror or err}", problems)
        return
    field = f"{line_field}: " if line_field else ""
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            bad = not_utf8(line)
            if bad:
                report(f"{path}:{number}: {field}{bad}", problems)
                continue
            yield number, line


def json_object(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """One JSONL line: ``(object, None)``, or ``(None, "(line): message")`` when it is not one JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"(line): not valid JSON: {err.msg} at column {err.colno}"
    if not isinstance(obj, dict):
        return None, "(line): a record must be a JSON object"
    return obj, None


def json_lines(path: str, problems: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every record of a JSONL file: :func:`text_lines` whose lines
    must each be one JSON object (anything else is a problem of its line)."""
    for number, line in text_lines(path, problems):
        obj, problem = json_object(line)
        if problem:
            report(f"{path}:{number}: {problem}", problems)
            continue
        yield number, obj
