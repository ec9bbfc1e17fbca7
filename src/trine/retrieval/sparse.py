"""Lexical (sparse) retrieval: an inverted index over lexical weights with impact scoring.

Documents' ``{token: weight}`` maps become postings sorted by term (a term-major CSR matrix:
``indptr`` per term into ``postings_rows`` / ``postings_weights``). A query's score for every
document is its sparse dot product with the query's weights, gathered from the postings of the
query's terms with one ``np.bincount``: the same number ``trine.scoring.lexical_matching_score``
gives for the pair, without visiting documents that share no term.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from trine.retrieval.base import (
    SearchResult,
    atomic_folder,
    check_ids,
    check_unique,
    read_ids,
    read_meta,
    score_rows,
    search_positive,
    write_ids,
    write_meta,
)
from trine.retrieval.protocol import register_index

LexicalWeights = Mapping[str, float]


def _check_weight(w: float, where: str, term: str) -> float:
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: weight of token {term!r} is {w}; lexical weights must be finite and >= 0")
    return w


def impact(w: float, scale: float | None) -> float:
    """The weight as indexed: unchanged, or FlagEmbedding's integer impact ``ceil(w * scale)``."""
    return w if scale is None else float(math.ceil(w * scale))


class SparseIndex:
    """Inverted index over lexical weights (``{token id string: weight}``, as ``M3Embedder`` returns).

    Keys are any strings (token ids or token strings), matched exactly. Zero weights are dropped;
    negative or non-finite weights are an error. Only documents sharing a term with the query
    (score > 0) are returned.

    ``impact_scale=None`` (default) keeps the weights as they are (float32), so scores equal
    ``lexical_matching_score``. ``impact_scale=100`` reproduces FlagEmbedding's BGE-M3 sparse runs
    (Lucene impact index): document and query weights become ``ceil(w * 100)`` integers, and scores
    are in units of 1/100^2 (divide by 10000 to compare).

    Implements :class:`trine.retrieval.Index` over ``lexical_weights``.
    """

    representation = "sparse"

    def __init__(self, vocab: dict[str, int] | None = None, indptr: np.ndarray | None = None,
                 postings_rows: np.ndarray | None = None, postings_weights: np.ndarray | None = None,
                 ids: list[str] | None = None, impact_scale: float | None = None):
        """The arrays of a built index (``SparseIndex()`` alone: an empty index to :meth:`add` to)."""
        if impact_scale is not None and not impact_scale > 0:
            raise ValueError(f"impact_scale must be positive or None, got {impact_scale}")
        parts = (vocab, indptr, postings_rows, postings_weights, ids)
        if all(p is None for p in parts):
            vocab, indptr, ids = {}, np.zeros(1, dtype=np.int64), []
            postings_rows, postings_weights = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        elif any(p is None for p in parts):
            raise ValueError("give all of vocab, indptr, postings_rows, postings_weights and ids, or none")
        self.vocab = vocab
        self.indptr = indptr
        self.postings_rows = postings_rows
        self.postings_weights = postings_weights
        self.ids = ids
        self.impact_scale = impact_scale

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, lexical_weights: Sequence[LexicalWeights], ids: Sequence[str] | None = None,
              impact_scale: float | None = None) -> SparseIndex:
        index = cls(impact_scale=impact_scale)
        index.add(lexical_weights, ids)
        return index

    def add(self, lexical_weights: Sequence[LexicalWeights], ids: Sequence[str] | None = None) -> None:
        """Append documents as new rows (ids default to the row numbers); on bad input nothing changes.

        Postings stay one term-major array: each call re-sorts them (cost grows with the index; add in
        large batches).
        """
        start = len(self.ids)
        new_ids = check_ids(ids, len(lexical_weights), start=start)
        check_unique(self.ids + new_ids)
        if start + len(new_ids) > np.iinfo(np.int32).max:
            raise ValueError("a SparseIndex holds at most 2**31 - 1 documents")
        vocab = dict(self.vocab)
        terms: list[int] = []
        rows: list[int] = []
        weights: list[float] = []
        for i, doc in enumerate(lexical_weights):
            if not isinstance(doc, Mapping):
                raise TypeError(f"lexical_weights[{i}] is a {type(doc).__name__}, not a {{token: weight}} mapping")
            for term, w in doc.items():
                w = impact(_check_weight(w, f"lexical_weights[{i}]", term), self.impact_scale)
                if w == 0:
                    continue
                terms.append(vocab.setdefault(str(term), len(vocab)))
                rows.append(start + i)
                weights.append(w)
        old_terms = np.repeat(np.arange(len(self.vocab), dtype=np.int64), np.diff(self.indptr))
        term_arr = np.concatenate([old_terms, np.asarray(terms, dtype=np.int64)])
        order = np.argsort(term_arr, kind="stable")  # rows stay ascending within a term
        indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(np.bincount(term_arr, minlength=len(vocab)), out=indptr[1:])
        self.postings_rows = np.concatenate([self.postings_rows, np.asarray(rows, dtype=np.int32)])[order]
        self.postings_weights = np.concatenate([self.postings_weights, np.asarray(weights, dtype=np.float32)])[order]
        self.indptr, self.vocab = indptr, vocab
        self.ids.extend(new_ids)

    # ------------------------------------------------------------------ scoring
    def score_all(self, query: LexicalWeights) -> np.ndarray:
        """The query's score for every document (float64, length ``len(self)``)."""
        starts, ends, qw = [], [], []
        for term, w in query.items():
            t = self.vocab.get(str(term))
            w = impact(_check_weight(w, "query", term), self.impact_scale)
            if t is not None and w > 0:
                starts.append(self.indptr[t])
                ends.append(self.indptr[t + 1])
                qw.append(w)
        if not starts:
            return np.zeros(len(self.ids), dtype=np.float64)
        if len(starts) == 1:
            sl = slice(starts[0], ends[0])
            return np.bincount(self.postings_rows[sl], self.postings_weights[sl] * np.float64(qw[0]),
                               minlength=len(self.ids))
        lengths = np.asarray(ends) - np.asarray(starts)
        # positions of every posting of every query term, in one gather
        offsets = np.repeat(np.asarray(starts) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        pos = np.arange(lengths.sum()) + offsets
        contrib = self.postings_weights[pos].astype(np.float64) * np.repeat(np.asarray(qw), lengths)
        return np.bincount(self.postings_rows[pos], contrib, minlength=len(self.ids))

    def search(self, queries: Sequence[LexicalWeights], k: int) -> SearchResult:
        return search_positive(self.score_all, queries, k)

    def score(self, queries: Sequence[LexicalWeights], rows: np.ndarray) -> np.ndarray:
        """Exact scores of query i with rows[i] (queries x m); -inf where rows is -1."""
        return score_rows(self.score_all, queries, rows)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``index.json``, ``ids.json``, ``vocab.json`` and ``postings.npz``; all or nothing."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            terms = [None] * len(self.vocab)
            for term, t in self.vocab.items():
                terms[t] = term
            with open(os.path.join(tmp, "vocab.json"), "w") as f:
                json.dump(terms, f)
            np.savez(os.path.join(tmp, "postings.npz"), indptr=self.indptr, rows=self.postings_rows,
                     weights=self.postings_weights)
            write_ids(tmp, self.ids)
            write_meta(tmp, "sparse", count=len(self.ids), terms=len(terms), postings=int(self.indptr[-1]),
                       impact_scale=self.impact_scale)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseIndex:
        meta = read_meta(path, "sparse")
        folder = os.fspath(path)
        with open(os.path.join(folder, "vocab.json")) as f:
            terms = json.load(f)
        with np.load(os.path.join(folder, "postings.npz")) as z:
            indptr, rows, weights = z["indptr"], z["rows"], z["weights"]
        if len(terms) != meta["terms"] or indptr.size != len(terms) + 1 or rows.size != meta["postings"]:
            raise ValueError(f"{folder}: vocab.json / postings.npz do not match index.json")
        return cls({t: i for i, t in enumerate(terms)}, indptr, rows, weights, read_ids(folder, meta["count"]),
                   meta["impact_scale"])


register_index("sparse", SparseIndex)
