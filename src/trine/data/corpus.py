"""Text corpora: JSONL files of ``{"text": str}`` (pre-training corpora, mining candidate pools),
the data folders every command accepts in place of a list of files, and retrieval corpora and
queries with ids (BEIR / FlagEmbedding layouts: :func:`read_corpus`, :func:`read_queries`).

Read with :mod:`trine.data.reader` (one reader, one error policy): every problem is
``file:line: field: message``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from trine.data.reader import DataError, json_lines, json_object, not_utf8, report, text_lines
from trine.data.text import text_problem
from trine.errors import InputError


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


# ------------------------------------------------------------------ retrieval corpora and queries
# A retrieval corpus is JSONL of ``{"<id>": str|int, "title"?: str, "text": str}``: BEIR's
# ``corpus.jsonl`` (id field ``_id``) or FlagEmbedding's custom layout (``id``). One reader for every
# command (``trine eval``, ``encode``, ``index``, ``serve --corpus``) so one file reads the same everywhere.

#: the id fields a corpus or queries file may use: BEIR's, then FlagEmbedding's custom layout's
ID_FIELDS = ("_id", "id")


class DatasetFormatError(InputError):
    """A corpus, queries or qrels file that does not follow its layout; the message names the file, the line
    and the field (the command line prints it and exits 2)."""


def record_lines(path: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a test-set file, numbered: :func:`trine.data.reader.text_lines` with the
    first problem raised (a test set is read whole before anything runs) as :class:`DatasetFormatError`."""
    if not os.path.isfile(path):
        raise DatasetFormatError(f"{path}: file not found")
    try:
        yield from text_lines(path, line_field=None)
    except DataError as err:
        raise DatasetFormatError(str(err)) from None


def json_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every record of a test-set JSONL file (the first problem raises)."""
    for lineno, line in record_lines(path):
        obj, problem = json_object(line)
        if problem:
            raise DatasetFormatError(f"{path}:{lineno}: {problem}")
        yield lineno, obj


def record_field(obj: dict[str, Any], name: str, where: str, kind: type, required: bool = True,
                 is_id: bool = False) -> Any:
    """Field ``name`` of a record at ``where`` (``file:line``), of type ``kind``: a missing optional field
    is ``kind()``; an integer id reads as its string (numeric ids are common in the wild); an integer
    field may be a string of digits (qrels written by other tools)."""
    if name not in obj:
        if not required:
            return kind()
        raise DatasetFormatError(f"{where}: field '{name}' is missing")
    value = obj[name]
    if is_id and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise DatasetFormatError(f"{where}: field '{name}' must be an integer, got {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetFormatError(f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__} "
                                 f"{value!r}")
    return value


def checked_text(value: str, name: str, where: str, may_be_blank: bool = False) -> str:
    """``value`` if :func:`trine.data.text_problem` (the one rule for a text trine encodes) finds nothing; a
    blank ``value`` passes when ``may_be_blank`` (a missing title, a passage whose title is its text)."""
    if may_be_blank and not value.strip():
        return value
    problem = text_problem(value)
    if problem:
        raise DatasetFormatError(f"{where}: field '{name}': {problem}")
    return value


def id_field_of(path: str, id_field: str | None = None) -> str:
    """The id rule, written once. A test set's layout names its field (``_id`` for BEIR, ``id`` for
    FlagEmbedding's custom layout) and every record must have it. A lone file (``trine encode``,
    ``index``, ``serve --corpus``) has no layout: its first record decides, ``_id`` when it has one, else
    ``id`` when it has one, else ``_id`` (so the first record's error names BEIR's field)."""
    if id_field is not None:
        if id_field not in ID_FIELDS:
            raise ValueError(f"id_field must be one of {ID_FIELDS}, not {id_field!r}")
        return id_field
    first: dict[str, Any] = {}
    try:
        records = json_records(path)
        first = next(records, (0, {}))[1]
        records.close()
    except DatasetFormatError:
        pass  # the reading names the bad line
    return next((f for f in ID_FIELDS if f in first), ID_FIELDS[0])


def read_corpus(path: str, id_field: str | None = None) -> dict[str, dict[str, str]]:
    """A retrieval corpus: id -> ``{"title", "text"}`` in file order (ids by :func:`id_field_of`, unique,
    ``title`` optional); the first problem raises :class:`DatasetFormatError` naming file, line and field."""
    path = os.fspath(path)
    id_field = id_field_of(path, id_field)
    corpus: dict[str, dict[str, str]] = {}
    for lineno, obj in json_records(path):
        where = f"{path}:{lineno}"
        doc_id = record_field(obj, id_field, where, str, is_id=True)
        if doc_id in corpus:
            raise DatasetFormatError(f"{where}: field '{id_field}': duplicate id {doc_id!r}")
        title = checked_text(record_field(obj, "title", where, str, required=False), "title", where, True)
        # the passage encoded is title + " " + text: an empty text is a passage when the title is not
        text = checked_text(record_field(obj, "text", where, str), "text", where, bool(title.strip()))
        corpus[doc_id] = {"title": title, "text": text}
    if not corpus:
        raise DatasetFormatError(f"{path}: no documents")
    return corpus


def passage_text(title: str, text: str) -> str:
    """The text a corpus document is encoded as, FlagEmbedding's rule: ``title + " " + text`` (stripped)
    when it has a title, else ``text``."""
    return (title + " " + text).strip() if title else text


def corpus_passages(corpus: dict[str, dict[str, str]]) -> tuple[list[str], list[str]]:
    """(doc ids, passage texts) of a corpus read by :func:`read_corpus`, in its order."""
    return list(corpus), [passage_text(d["title"], d["text"]) for d in corpus.values()]


def read_queries(path: str, id_field: str | None = None) -> dict[str, str]:
    """A queries file: id -> text in file order (ids by :func:`id_field_of`, unique); the first problem
    raises :class:`DatasetFormatError` naming file, line and field."""
    path = os.fspath(path)
    id_field = id_field_of(path, id_field)
    queries: dict[str, str] = {}
    for lineno, obj in json_records(path):
        where = f"{path}:{lineno}"
        qid = record_field(obj, id_field, where, str, is_id=True)
        if qid in queries:
            raise DatasetFormatError(f"{where}: field '{id_field}': duplicate id {qid!r}")
        queries[qid] = checked_text(record_field(obj, "text", where, str), "text", where)
    return queries
