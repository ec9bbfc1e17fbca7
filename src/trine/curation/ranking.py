"""Ranking a candidate pool for hard-negative mining: search and exact scores over the pool's
indexes, dense or hybrid (``w_dense * dense + w_sparse * lexical``) (:class:`PoolRanker`), or ColBERT
maxsim over the pool's multi-vectors (:class:`ColbertPoolRanker`). Both answer the same three calls:
``search``, ``score_rows`` (pool rows) and ``score_outside`` (a positive that is not in the pool)."""

from __future__ import annotations

from typing import Any

import numpy as np

import trine.scoring as scoring
from trine.data.records import Record
from trine.retrieval.base import SearchResult
from trine.retrieval.dense import DenseIndex
from trine.retrieval.hybrid import HybridRetriever, QueryReps
from trine.retrieval.sparse import SparseIndex

# Upper bound on the (queries x candidates x dim) float32 block that exact hybrid re-scoring builds.
HYBRID_BLOCK_ELEMENTS = 1 << 24


class PoolRanker:
    """Search and exact scoring over the pool: dense, or hybrid dense + sparse."""

    def __init__(self, dense: DenseIndex, sparse: SparseIndex | None, weights: tuple[float, float] | None,
                 candidates: int, normalization: str = "none"):
        self.dense, self.sparse, self.weights, self.candidates = dense, sparse, weights, candidates
        self.normalization = normalization
        self.hybrid = HybridRetriever(dense, sparse) if sparse is not None else None

    def search(self, reps: QueryReps, k: int) -> SearchResult:
        if self.hybrid is None:
            return self.dense.search(reps.dense_vecs, k)
        w_d, w_s = self.weights
        n = len(reps.dense_vecs)
        step = max(1, HYBRID_BLOCK_ELEMENTS // (2 * self.candidates * self.dense.dim))
        parts = []
        for s in range(0, n, step):
            sub = QueryReps(reps.dense_vecs[s : s + step], reps.lexical_weights[s : s + step])
            parts.append(self.hybrid.search(sub, k, {"dense": w_d, "sparse": w_s}, candidate_modes=("dense", "sparse"),
                                            candidate_k=self.candidates, normalization=self.normalization))
        return SearchResult(np.concatenate([p.scores for p in parts]), np.concatenate([p.rows for p in parts]))

    def score_rows(self, reps: QueryReps, rows: np.ndarray) -> np.ndarray:
        """Exact scores of query i with pool rows[i] (-1 padding gives -inf): the raw weighted sum (a
        normalization, which depends on each query's candidate union, applies to the ranking only)."""
        dense = self.dense.score(reps.dense_vecs, rows).astype(np.float64)
        if self.sparse is None:
            return dense
        w_d, w_s = self.weights
        sparse = self.sparse.score(reps.lexical_weights, rows)
        return np.where(rows >= 0, w_d * dense + w_s * sparse, -np.inf)

    def score_outside(self, reps: QueryReps, i: int, outside: QueryReps, o: int) -> float:
        """Exact score of query i with passage ``o`` of ``outside`` (encoded passages not in the pool)."""
        d = float(np.dot(reps.dense_vecs[i].astype(np.float64), np.asarray(outside.dense_vecs[o], dtype=np.float64)))
        if self.sparse is None:
            return d
        w_d, w_s = self.weights
        return w_d * d + w_s * scoring.lexical_matching_score(reps.lexical_weights[i], outside.lexical_weights[o])


class ColbertPoolRanker:
    """ColBERT maxsim over the pool's multi-vectors, through a multi-vector index: every passage scanned
    exactly (:class:`trine.retrieval.MultiVectorIndex`) or the compressed index's own candidates, scored on
    decompressed vectors (:class:`trine.retrieval.plaid.ColbertPlaidIndex`). Scores are the index's
    (decompressed for plaid); a positive outside the pool scores exactly on its own vectors."""

    def __init__(self, index: Any):
        self.index = index

    def search(self, reps: QueryReps, k: int) -> SearchResult:
        return self.index.search(reps.colbert_vecs, k)

    def score_rows(self, reps: QueryReps, rows: np.ndarray) -> np.ndarray:
        return self.index.score(reps.colbert_vecs, rows).astype(np.float64)  # -inf where rows is -1

    def score_outside(self, reps: QueryReps, i: int, outside: QueryReps, o: int) -> float:
        return float(scoring.colbert_score(reps.colbert_vecs[i], outside.colbert_vecs[o]))


def positive_scores(ranker: PoolRanker | ColbertPoolRanker, reps: QueryReps, batch: list[Record],
                    position: dict[str, int],
                    outside: QueryReps | None, outside_at: dict[str, int]) -> list[list[float]]:
    """Each record's positive scores, exact: pool rows by ``position``, the others from their
    encodings ``outside`` (row ``outside_at[text]``)."""
    width = max(len(r.pos) for r in batch)
    rows = np.full((len(batch), width), -1, dtype=np.int64)
    for j, r in enumerate(batch):
        for k, t in enumerate(r.pos):
            rows[j, k] = position.get(t, -1)
    in_pool = ranker.score_rows(reps, rows)
    out = []
    for j, r in enumerate(batch):
        scores = []
        for k, t in enumerate(r.pos):
            if rows[j, k] >= 0:
                scores.append(float(in_pool[j, k]))
            else:
                scores.append(ranker.score_outside(reps, j, outside, outside_at[t]))
        out.append(scores)
    return out

