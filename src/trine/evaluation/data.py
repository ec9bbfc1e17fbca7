"""Retrieval test sets on disk: BEIR's layout and FlagEmbedding's custom layout.

BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
``qrels/<split>.tsv`` (header ``query-id  corpus-id  score``).
FlagEmbedding custom: ``corpus.jsonl`` (``id``, ``title``, ``text``), ``<split>_queries.jsonl``
(``id``, ``text``), ``<split>_qrels.jsonl`` (``qid``, ``docid``, ``relevance``).

Bad input raises :class:`DatasetFormatError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from trine.data.reader import DataError, text_lines
from trine.data.text import text_problem
from trine.errors import InputError

Layout = Literal["auto", "beir", "custom"]
LAYOUTS = ("auto", "beir", "custom")


class DatasetFormatError(InputError):
    """A test-set file that does not follow its layout; the message names file, line and field
    (the command line prints it and exits 2)."""


@dataclass
class RetrievalDataset:
    """``corpus``: id -> {"title", "text"}; ``queries``: id -> text (only queries with qrels in the split);
    ``qrels``: query id -> {doc id: relevance}."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    split: str = ""
    layout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def passages(self) -> tuple[list[str], list[str]]:
        """(doc ids, texts) with the text as FlagEmbedding encodes it: ``title + " " + text`` (title if any)."""
        ids = list(self.corpus)
        texts = [(d["title"] + " " + d["text"]).strip() if d["title"] else d["text"] for d in self.corpus.values()]
        return ids, texts


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, numbered; a missing file or a byte that is not
    UTF-8 raises :class:`DatasetFormatError` naming the file (and line)."""
    if not os.path.isfile(path):
        raise DatasetFormatError(f"{path}: file not found")
    try:
        yield from text_lines(path, line_field=None)  # no problems list: the first problem raises
    except DataError as err:
        raise DatasetFormatError(str(err)) from None


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _field(obj: dict[str, Any], name: str, path: str, lineno: int, kind: type, required: bool = True,
           is_id: bool = False) -> Any:
    if name not in obj:
        if not required:
            return kind()
        raise DatasetFormatError(f"{path}:{lineno}: field '{name}' is missing")
    value = obj[name]
    if is_id and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # numeric ids are common in the wild
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise DatasetFormatError(f"{path}:{lineno}: field '{name}' must be an integer, got {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetFormatError(
            f"{path}:{lineno}: field '{name}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _check_text(value: str, name: str, path: str, lineno: int, may_be_blank: bool = False) -> str:
    """``value`` if :func:`trine.data.text_problem` (the one rule for a text trine encodes) finds nothing; a
    blank ``value`` passes when ``may_be_blank`` (a missing title, a BEIR passage whose title is its text)."""
    if may_be_blank and not value.strip():
        return value
    problem = text_problem(value)
    if problem:
        raise DatasetFormatError(f"{path}:{lineno}: field '{name}': {problem}")
    return value


def _load_corpus(path: str, id_field: str) -> dict[str, dict[str, str]]:
    corpus: dict[str, dict[str, str]] = {}
    for lineno, obj in _jsonl(path):
        doc_id = _field(obj, id_field, path, lineno, str, is_id=True)
        if doc_id in corpus:
            raise DatasetFormatError(f"{path}:{lineno}: field '{id_field}': duplicate id {doc_id!r}")
        title = _check_text(_field(obj, "title", path, lineno, str, required=False), "title", path, lineno, True)
        # the passage encoded is title + " " + text: an empty text is a passage when the title is not
        text = _check_text(_field(obj, "text", path, lineno, str), "text", path, lineno, bool(title.strip()))
        corpus[doc_id] = {"title": title, "text": text}
    if not corpus:
        raise DatasetFormatError(f"{path}: no documents")
    return corpus


def _load_queries(path: str, id_field: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, obj in _jsonl(path):
        qid = _field(obj, id_field, path, lineno, str, is_id=True)
        if qid in queries:
            raise DatasetFormatError(f"{path}:{lineno}: field '{id_field}': duplicate id {qid!r}")
        queries[qid] = _check_text(_field(obj, "text", path, lineno, str), "text", path, lineno)
    return queries


def _add_qrel(qrels: dict[str, dict[str, int]], qid: str, did: str, rel: int, where: str,
              corpus: dict[str, Any], queries: dict[str, str], fields: tuple[str, str]) -> None:
    if qid not in queries:
        raise DatasetFormatError(f"{where}: field '{fields[0]}': query {qid!r} is not in the queries file")
    if did not in corpus:
        raise DatasetFormatError(f"{where}: field '{fields[1]}': document {did!r} is not in the corpus")
    if did in qrels.setdefault(qid, {}):
        raise DatasetFormatError(f"{where}: duplicate judgement for query {qid!r} and document {did!r}")
    qrels[qid][did] = rel


def _load_beir_qrels(path: str, corpus: dict[str, Any], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    header = ["query-id", "corpus-id", "score"]
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _lines(path):
        line = line.rstrip("\n").rstrip("\r")
        parts = line.split("\t")
        if lineno == 1:
            if parts != header:
                raise DatasetFormatError(f"{path}:1: header must be {' '.join(header)!r} (tab-separated), "
                                         f"got {line!r}")
            continue
        if len(parts) != 3:
            raise DatasetFormatError(f"{path}:{lineno}: expected 3 tab-separated fields "
                                     f"(query-id, corpus-id, score), got {len(parts)}")
        try:
            rel = int(parts[2])
        except ValueError:
            msg = f"{path}:{lineno}: field 'score' must be an integer, got {parts[2]!r}"
            raise DatasetFormatError(msg) from None
        _add_qrel(qrels, parts[0], parts[1], rel, f"{path}:{lineno}", corpus, queries, ("query-id", "corpus-id"))
    return qrels


def _load_custom_qrels(path: str, corpus: dict[str, Any], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for lineno, obj in _jsonl(path):
        qid = _field(obj, "qid", path, lineno, str, is_id=True)
        did = _field(obj, "docid", path, lineno, str, is_id=True)
        rel = _field(obj, "relevance", path, lineno, int)
        _add_qrel(qrels, qid, did, rel, f"{path}:{lineno}", corpus, queries, ("qid", "docid"))
    return qrels


def detect_layout(folder: str | os.PathLike, split: str) -> Literal["beir", "custom"]:
    folder = os.fspath(folder)
    if os.path.exists(os.path.join(folder, "qrels", f"{split}.tsv")):
        return "beir"
    if os.path.exists(os.path.join(folder, f"{split}_qrels.jsonl")):
        return "custom"
    raise DatasetFormatError(
        f"{folder}: neither qrels/{split}.tsv (BEIR layout) nor {split}_qrels.jsonl (FlagEmbedding custom layout) "
        "found"
    )


def load_dataset(folder: str | os.PathLike, split: str = "test", layout: Layout = "auto") -> RetrievalDataset:
    """Load one split of a test set; only queries judged in that split are kept."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DatasetFormatError(f"{folder}: not a folder")
    if layout == "auto":
        layout = detect_layout(folder, split)
    if layout == "beir":
        corpus = _load_corpus(os.path.join(folder, "corpus.jsonl"), "_id")
        queries = _load_queries(os.path.join(folder, "queries.jsonl"), "_id")
        qrels = _load_beir_qrels(os.path.join(folder, "qrels", f"{split}.tsv"), corpus, queries)
    else:
        corpus = _load_corpus(os.path.join(folder, "corpus.jsonl"), "id")
        queries = _load_queries(os.path.join(folder, f"{split}_queries.jsonl"), "id")
        qrels = _load_custom_qrels(os.path.join(folder, f"{split}_qrels.jsonl"), corpus, queries)
    if not qrels:
        raise DatasetFormatError(f"{folder}: split {split!r} has no relevance judgements")
    queries = {q: queries[q] for q in qrels}
    return RetrievalDataset(corpus, queries, qrels, name=os.path.basename(os.path.abspath(folder)), split=split,
                            layout=layout)
