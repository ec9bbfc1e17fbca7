"""Retrieval test sets on disk: BEIR's layout and FlagEmbedding's custom layout.

BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
``qrels/<split>.tsv`` (header ``query-id  corpus-id  score``).
FlagEmbedding custom: ``corpus.jsonl`` (``id``, ``title``, ``text``), ``<split>_queries.jsonl``
(``id``, ``text``), ``<split>_qrels.jsonl`` (``qid``, ``docid``, ``relevance``).

Bad input raises :class:`DatasetFormatError` naming the file, the line and the field. The corpus and
queries files are read by :mod:`trine.data.corpus` (the one corpus reader, with its id rule); this module
adds the layouts, the qrels and the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from trine.data.corpus import (
    DatasetFormatError,
    corpus_passages,
    json_records,
    read_corpus,
    read_queries,
    record_field,
    record_lines,
)

__all__ = ["LAYOUTS", "DatasetFormatError", "Layout", "RetrievalDataset", "detect_layout", "load_dataset"]

Layout = Literal["auto", "beir", "custom"]
LAYOUTS = ("auto", "beir", "custom")


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
        return corpus_passages(self.corpus)


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
    for lineno, line in record_lines(path):
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
    for lineno, obj in json_records(path):
        where = f"{path}:{lineno}"
        qid = record_field(obj, "qid", where, str, is_id=True)
        did = record_field(obj, "docid", where, str, is_id=True)
        rel = record_field(obj, "relevance", where, int)
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
        corpus = read_corpus(os.path.join(folder, "corpus.jsonl"), "_id")
        queries = read_queries(os.path.join(folder, "queries.jsonl"), "_id")
        qrels = _load_beir_qrels(os.path.join(folder, "qrels", f"{split}.tsv"), corpus, queries)
    else:
        corpus = read_corpus(os.path.join(folder, "corpus.jsonl"), "id")
        queries = read_queries(os.path.join(folder, f"{split}_queries.jsonl"), "id")
        qrels = _load_custom_qrels(os.path.join(folder, f"{split}_qrels.jsonl"), corpus, queries)
    if not qrels:
        raise DatasetFormatError(f"{folder}: split {split!r} has no relevance judgements")
    queries = {q: queries[q] for q in qrels}
    return RetrievalDataset(corpus, queries, qrels, name=os.path.basename(os.path.abspath(folder)), split=split,
                            layout=layout)
