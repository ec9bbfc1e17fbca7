"""What every index shares: the search result type, deterministic top-k, atomic folder writes, id checks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trine.io import atomic_folder  # noqa: F401  (re-exported for the index modules)

FORMAT_VERSION = 1


@dataclass
class SearchResult:
    """Per query, the best rows first: ``scores`` and ``rows`` are (queries x k).

    ``rows`` index the index's documents (``index.ids[row]``); a query with fewer than ``k``
    results is padded with row -1 and score -inf.
    """

    scores: np.ndarray
    rows: np.ndarray

    def __post_init__(self) -> None:
        if self.scores.shape != self.rows.shape or self.scores.ndim != 2:
            raise ValueError(f"scores {self.scores.shape} and rows {self.rows.shape} must be equal 2-d shapes")

    def __len__(self) -> int:
        return self.rows.shape[0]

    def to_run(self, query_ids: Sequence[str], doc_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        """``{query id: {doc id: score}}`` (the run format of pytrec_eval), padding left out."""
        if len(query_ids) != len(self):
            raise ValueError(f"{len(query_ids)} query ids for {len(self)} result rows")
        run: dict[str, dict[str, float]] = {}
        for qid, rows, scores in zip(query_ids, self.rows, self.scores):
            keep = rows >= 0
            run[qid] = {doc_ids[r]: float(s) for r, s in zip(rows[keep].tolist(), scores[keep].tolist())}
        return run


def pad_results(per_query: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> SearchResult:
    """Stack per-query (scores, rows) of at most ``k`` entries into a padded :class:`SearchResult`."""
    scores = np.full((len(per_query), k), -np.inf, dtype=np.float32)
    rows = np.full((len(per_query), k), -1, dtype=np.int64)
    for i, (s, r) in enumerate(per_query):
        scores[i, : len(s)] = s
        rows[i, : len(r)] = r
    return SearchResult(scores, rows)


def unique_rows(rows: np.ndarray) -> np.ndarray:
    """Per query (row of ``rows``), its distinct non-negative row numbers, sorted, padded with -1."""
    merged = [np.unique(r[r >= 0]) for r in np.asarray(rows, dtype=np.int64)]
    out = np.full((len(merged), max((m.size for m in merged), default=0)), -1, dtype=np.int64)
    for i, m in enumerate(merged):
        out[i, : m.size] = m
    return out


def top_k(scores: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (scores, rows) of one query, best first; ties go to the lower row (deterministic).

    ``scores`` is over all rows, or over ``candidates`` (row numbers) when given.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rows = np.arange(scores.size) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if scores.size > k:
        threshold = np.partition(scores, scores.size - k)[scores.size - k]
        above = np.flatnonzero(scores > threshold)
        tied = np.flatnonzero(scores == threshold)
        if candidates is not None:
            tied = tied[np.argsort(rows[tied], kind="stable")]
        pick = np.concatenate([above, tied[: k - above.size]])
    else:
        pick = np.arange(scores.size)
    order = np.lexsort((rows[pick], -scores[pick]))
    pick = pick[order]
    return scores[pick], rows[pick]


def search_positive(score_all: Callable[[Any], np.ndarray], queries: Sequence[Any], k: int) -> SearchResult:
    """Each query's ``k`` best rows among those scoring above 0 under ``score_all(query)`` (every
    row's score): the search of the term-matching indexes (lexical weights, BM25)."""
    out = []
    for q in queries:
        scores = score_all(q)
        hit = np.flatnonzero(scores > 0)
        out.append(top_k(scores[hit], k, hit) if hit.size else (np.zeros(0), np.zeros(0, dtype=np.int64)))
    return pad_results(out, k)


def score_rows(score_all: Callable[[Any], np.ndarray], queries: Sequence[Any], rows: np.ndarray) -> np.ndarray:
    """Exact scores of query i with rows[i] (queries x m) from ``score_all``; -inf where rows is -1."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[0] != len(queries):
        raise ValueError(f"rows must be (queries x m) with {len(queries)} queries, got {rows.shape}")
    out = np.full(rows.shape, -np.inf, dtype=np.float64)
    for i, q in enumerate(queries):
        valid = rows[i] >= 0
        out[i, valid] = score_all(q)[rows[i, valid]]
    return out


def check_ids(ids: Sequence[str] | None, count: int, start: int = 0) -> list[str]:
    """Document ids as strings, one per document and unique; by default the row numbers."""
    if ids is None:
        return [str(i) for i in range(start, start + count)]
    ids = [str(i) for i in ids]
    if len(ids) != count:
        raise ValueError(f"{len(ids)} ids for {count} documents")
    return ids


def check_unique(ids: Sequence[str]) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"document ids must be unique; {dup!r} appears more than once")


def write_meta(folder: str, kind: str, **fields: Any) -> None:
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"format": FORMAT_VERSION, "kind": kind, **fields}, f, indent=1)


def read_meta(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    path = os.path.join(os.fspath(folder), "index.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {folder} a saved trine {kind} index?")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("kind") != kind:
        raise ValueError(f"{path}: field 'kind' is {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format' is {meta.get('format')!r}; this trine reads {FORMAT_VERSION}")
    return meta


def write_ids(folder: str, ids: Sequence[str]) -> None:
    with open(os.path.join(folder, "ids.json"), "w") as f:
        json.dump(list(ids), f)


def read_ids(folder: str | os.PathLike, count: int) -> list[str]:
    path = os.path.join(os.fspath(folder), "ids.json")
    with open(path) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or len(ids) != count:
        raise ValueError(f"{path}: expected a list of {count} ids")
    return [str(i) for i in ids]
