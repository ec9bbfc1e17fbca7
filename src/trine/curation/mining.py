"""`trine mine`: hard negatives for a training file from an index over a candidate pool.

For each record: search the pool for the query (with its instruction), take the candidates
ranked in ``range_for_sampling`` (0-based, end exclusive, as FlagEmbedding's ``2-100``), drop
positives, the query itself and duplicates, optionally drop likely false negatives (score above
``(1 - relative_margin) x`` the lowest positive score), and sample ``negative_number`` of what
remains.

Ranking is dense (exact FAISS inner product by default; ``index_kind`` "hnsw" or "ivf" for an
approximate index) or, for M3 models, hybrid: ``w_dense * dense + w_sparse * lexical`` scored
exactly over the union of the dense and the sparse top ``hybrid_candidates`` (FlagEmbedding's
MLDR recipe, through :class:`trine.retrieval.HybridRetriever`).

Memory: the pool's encodings live once, inside the indexes (optionally read from an on-disk
cache, :mod:`trine.curation.cache`). Queries are encoded ``query_chunk_size`` at a time and
searched ``search_batch_size`` at a time, and output rows are written as they are made, so the
rest is a bounded working set: never a queries x pool matrix, never all query embeddings.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from trine import scoring
from trine.curation.cache import CorpusEncodings
from trine.curation.common import (
    atomic_jsonl,
    check_output,
    dense_array,
    is_m3,
    iter_raw_rows,
    percentiles,
    quiet,
    read_records,
    write_row,
)
from trine.retrieval.base import SearchResult
from trine.retrieval.dense import DENSE_KINDS, DenseIndex
from trine.retrieval.hybrid import HybridRetriever, QueryReps
from trine.retrieval.sparse import SparseIndex
from trine.training.data import DataError, Record, parse_text_line

logger = logging.getLogger(__name__)

BACKFILL = ("random", "none", "error")
INDEX_OPTIONS = ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe")
# Upper bound on the (queries x candidates x dim) float32 block that exact hybrid re-scoring builds.
HYBRID_BLOCK_ELEMENTS = 1 << 24


@dataclass
class MiningSummary:
    records: int = 0
    pool: int = 0
    ranking: str = "dense"
    index_kind: str = "flat"
    cache: str = "off"
    dropped_as_positive_or_query: int = 0
    dropped_by_margin: int = 0
    backfilled: int = 0
    short: int = 0
    seconds_corpus: float = 0.0
    seconds_queries: float = 0.0
    positive_scores: array = field(default_factory=lambda: array("f"))
    negative_scores: array = field(default_factory=lambda: array("f"))

    def lines(self) -> list[str]:
        return [
            f"records {self.records}, candidate pool {self.pool}, ranking {self.ranking}, index {self.index_kind}, "
            f"embedding cache {self.cache}",
            f"candidates dropped as a positive, the query or a duplicate: {self.dropped_as_positive_or_query}",
            f"candidates dropped by the relative margin (likely false negatives): {self.dropped_by_margin}",
            f"negatives back-filled at random: {self.backfilled}; records left short: {self.short}",
            f"positive scores: {percentiles(self.positive_scores)}",
            f"mined negative scores: {percentiles(self.negative_scores)}",
            f"time: pool encoding and indexing {self.seconds_corpus:.1f} s, queries (encode + search + sample) "
            f"{self.seconds_queries:.1f} s",
        ]


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"range_for_sampling must look like 2-100, got {text!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"range_for_sampling needs 0 <= start < end, got {text!r}")
    return lo, hi


def read_pool(path: str) -> list[str]:
    """A candidate pool: JSONL of {"text": str} (other fields ignored); problems reported as file:line: field."""
    texts, problems = [], []
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError([f"{path}: cannot open: {err.strerror or err}"]) from None
    with handle as f:
        for number, raw in enumerate(f, start=1):
            text, problem = parse_text_line(raw)
            if problem:
                problems.append(f"{path}:{number}: {problem}")
            elif text is not None:
                texts.append(text)
    if problems:
        raise DataError(problems)
    if not texts:
        raise DataError([f"{path}: no candidate passages"])
    return texts


class _Ranker:
    """Search and exact scoring over the pool: dense, or hybrid dense + sparse."""

    def __init__(self, dense: DenseIndex, sparse: SparseIndex | None, weights: tuple[float, float] | None,
                 candidates: int):
        self.dense, self.sparse, self.weights, self.candidates = dense, sparse, weights, candidates
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
                                            candidate_k=self.candidates))
        return SearchResult(np.concatenate([p.scores for p in parts]), np.concatenate([p.rows for p in parts]))

    def score_rows(self, reps: QueryReps, rows: np.ndarray) -> np.ndarray:
        """Exact scores of query i with pool rows[i] (-1 padding gives -inf)."""
        dense = self.dense.score(reps.dense_vecs, rows).astype(np.float64)
        if self.sparse is None:
            return dense
        w_d, w_s = self.weights
        sparse = self.sparse.score(reps.lexical_weights, rows)
        return np.where(rows >= 0, w_d * dense + w_s * sparse, -np.inf)

    def score_vector(self, reps: QueryReps, i: int, dense_vec: np.ndarray, lexical: dict | None) -> float:
        """Exact score of query i with a passage outside the pool."""
        d = float(np.dot(reps.dense_vecs[i].astype(np.float64), np.asarray(dense_vec, dtype=np.float64)))
        if self.sparse is None:
            return d
        w_d, w_s = self.weights
        return w_d * d + w_s * scoring.lexical_matching_score(reps.lexical_weights[i], lexical)


def _encode(embedder: Any, texts: list[str], queries: bool, sparse: bool) -> QueryReps:
    if is_m3(embedder):
        fn = embedder.encode_queries if queries else embedder.encode_corpus
        enc = fn(texts, return_dense=True, return_sparse=sparse, return_colbert_vecs=False)
        return QueryReps(dense_array(enc), enc["lexical_weights"] if sparse else None)
    fn = embedder.encode_queries if queries else embedder.encode_corpus
    return QueryReps(dense_array(fn(texts)))


def mine_hard_negatives(
    input_file: str,
    output_file: str,
    embedder,  # trine.Embedder or trine.M3Embedder
    *,
    candidate_pool: str | None = None,
    range_for_sampling: tuple[int, int] = (2, 100),
    negative_number: int = 15,
    relative_margin: float | None = None,
    backfill: str = "random",
    search_batch_size: int = 256,
    seed: int = 42,
    hybrid_weights: Sequence[float] | None = None,
    hybrid_candidates: int | None = None,
    index_kind: str = "flat",
    index_options: dict[str, int] | None = None,
    cache_dir: str | None = None,
    query_chunk_size: int = 2048,
    corpus_block_size: int = 16384,
    show_progress: bool = True,
) -> MiningSummary:
    """Write ``output_file`` (atomically; never the input) with mined ``neg`` lists.

    ``hybrid_weights=(w_dense, w_sparse)`` ranks by the weighted sum of dense and lexical scores
    (an ``M3Embedder`` is needed); ``hybrid_candidates`` (default: the end of the range) is the
    depth of each first-stage list whose union is re-scored exactly. ``cache_dir`` keeps the
    pool's encodings on disk for the next run. The pool is encoded (or read from the cache)
    ``corpus_block_size`` passages at a time; an IVF index trains on the first block.
    """
    check_output([input_file, candidate_pool], output_file)
    if backfill not in BACKFILL:
        raise ValueError(f"backfill must be one of {BACKFILL}, got {backfill!r}")
    if negative_number < 1:
        raise ValueError(f"negative_number must be positive, got {negative_number}")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise ValueError(f"relative_margin must be in [0, 1), got {relative_margin}")
    if search_batch_size < 1 or query_chunk_size < 1:
        raise ValueError("search_batch_size and query_chunk_size must be positive")
    if index_kind not in DENSE_KINDS:
        raise ValueError(f"index_kind must be one of {DENSE_KINDS}, got {index_kind!r}")
    options = dict(index_options or {})
    unknown = set(options) - set(INDEX_OPTIONS)
    if unknown:
        raise ValueError(f"unknown index options {sorted(unknown)} (known: {', '.join(INDEX_OPTIONS)})")
    hybrid = hybrid_weights is not None
    weights: tuple[float, float] | None = None
    if hybrid:
        if len(hybrid_weights) != 2 or any(not np.isfinite(w) or w < 0 for w in hybrid_weights) \
                or not any(hybrid_weights):
            raise ValueError(f"hybrid_weights needs two non-negative numbers (dense, sparse), got {hybrid_weights}")
        if not is_m3(embedder):
            raise ValueError("hybrid ranking needs lexical weights: load the model as an M3Embedder (BGE-M3 heads)")
        weights = (float(hybrid_weights[0]), float(hybrid_weights[1]))
    elif hybrid_candidates is not None:
        raise ValueError("hybrid_candidates goes with hybrid_weights")
    lo, hi = range_for_sampling
    records = read_records(input_file)
    if candidate_pool is not None:
        pool = list(dict.fromkeys(read_pool(candidate_pool)))
    else:
        pool = list(dict.fromkeys(t for r in records for t in (*r.pos, *r.neg)))
    summary = MiningSummary(records=len(records), pool=len(pool), index_kind=index_kind,
                            ranking="dense" if not hybrid else f"hybrid dense x {weights[0]} + sparse x {weights[1]}")
    position = {t: i for i, t in enumerate(pool)}

    started = time.perf_counter()
    outputs = ("dense", "sparse") if hybrid else ("dense",)
    corpus = CorpusEncodings(embedder, pool, outputs, cache_dir, block_size=corpus_block_size)
    summary.cache = corpus.status
    dense_index: DenseIndex | None = None
    lexical: list[dict[str, float]] = []
    for block in corpus.blocks():  # the index grows block by block: no second copy of the pool's vectors
        if dense_index is None:
            dense_index = DenseIndex(block["dense_vecs"].shape[1], index_kind, **options)
        dense_index.add(block["dense_vecs"])
        if hybrid:
            lexical.extend(block["lexical_weights"])
    sparse_index = SparseIndex.build(lexical) if hybrid else None
    del lexical
    depth = min(hi, len(pool))
    candidates = depth if hybrid_candidates is None else int(hybrid_candidates)
    if candidates < 1:
        raise ValueError(f"hybrid_candidates must be positive, got {hybrid_candidates}")
    ranker = _Ranker(dense_index, sparse_index, weights, min(candidates, len(pool)))
    summary.seconds_corpus = time.perf_counter() - started

    started = time.perf_counter()
    raw_rows = iter_raw_rows(input_file)
    bar = tqdm(total=len(records), desc="mine", disable=not show_progress, unit="query")
    try:
        with atomic_jsonl(output_file) as out, quiet(embedder):
            for c0 in range(0, len(records), query_chunk_size):
                chunk = records[c0 : c0 + query_chunk_size]
                reps = _encode(embedder, [r.query for r in chunk], queries=True, sparse=hybrid)
                outside = list(dict.fromkeys(t for r in chunk for t in r.pos if t not in position))
                outside_reps = _encode(embedder, outside, queries=False, sparse=hybrid) if outside else None
                outside_at = {t: j for j, t in enumerate(outside)}
                for b0 in range(0, len(chunk), search_batch_size):
                    batch = chunk[b0 : b0 + search_batch_size]
                    sub = QueryReps(reps.dense_vecs[b0 : b0 + len(batch)],
                                    reps.lexical_weights[b0 : b0 + len(batch)] if hybrid else None)
                    result = ranker.search(sub, depth)
                    pos_scores = _positive_scores(ranker, sub, batch, position, outside_reps, outside_at)
                    picked = []
                    for j, record in enumerate(batch):
                        i = c0 + b0 + j
                        summary.positive_scores.extend(pos_scores[j])
                        ceiling = None if relative_margin is None else (1 - relative_margin) * min(pos_scores[j])
                        picked.append(_pick(record, pool, result.rows[j, lo:depth], result.scores[j, lo:depth],
                                            ceiling, negative_number, np.random.default_rng([seed, i]), summary,
                                            backfill))
                    width = max((len(p) for p in picked), default=0)
                    if width:
                        rows = np.full((len(batch), width), -1, dtype=np.int64)
                        for j, p in enumerate(picked):
                            rows[j, : len(p)] = p
                        neg_scores = ranker.score_rows(sub, rows)
                        summary.negative_scores.extend(neg_scores[rows >= 0].astype(np.float32).tolist())
                    for p in picked:
                        row = next(raw_rows)
                        row["neg"] = [pool[r] for r in p]
                        row.pop("neg_scores", None)  # scores of the old negatives no longer apply
                        write_row(out, row)
                    bar.update(len(batch))
    finally:
        bar.close()
    summary.seconds_queries = time.perf_counter() - started
    return summary


def _positive_scores(ranker: _Ranker, reps: QueryReps, batch: list[Record], position: dict[str, int],
                     outside: QueryReps | None, outside_at: dict[str, int]) -> list[list[float]]:
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
                o = outside_at[t]
                scores.append(ranker.score_vector(reps, j, outside.dense_vecs[o],
                                                  outside.lexical_weights[o] if outside.lexical_weights else None))
        out.append(scores)
    return out


def _pick(record: Record, pool: Sequence[str], rows: np.ndarray, scores: np.ndarray, ceiling: float | None,
          count: int, rng: np.random.Generator, summary: MiningSummary, backfill: str) -> list[int]:
    """Pool rows of the chosen negatives (in rank order, back-filled ones after)."""
    banned = {t.strip() for t in (*record.pos, record.query)}
    candidates: list[int] = []
    seen: set[str] = set()
    for row, score in zip(rows.tolist(), scores.tolist()):
        if row < 0:
            continue
        text = pool[row].strip()
        if text in banned or text in seen:
            summary.dropped_as_positive_or_query += 1
            continue
        if ceiling is not None and score > ceiling:
            summary.dropped_by_margin += 1
            continue
        candidates.append(row)
        seen.add(text)
    if len(candidates) > count:
        picks = rng.choice(len(candidates), size=count, replace=False)
        return [candidates[j] for j in sorted(picks)]
    chosen = list(candidates)
    if len(chosen) < count:
        if backfill == "error":
            raise DataError([f"line {record.line}: neg: only {len(chosen)} candidates left, {count} asked "
                             "(backfill='random' fills from the pool)"])
        if backfill == "random":
            avoid = banned | seen
            tries = 0
            while len(chosen) < count and tries < 20 * count:  # rejection sampling: no O(pool) work per query
                tries += 1
                j = int(rng.integers(len(pool)))
                if pool[j].strip() not in avoid:
                    chosen.append(j)
                    avoid.add(pool[j].strip())
                    summary.backfilled += 1
            if len(chosen) < count:  # a pool that is mostly banned texts: scan it once
                for j in rng.permutation(len(pool)).tolist():
                    if len(chosen) >= count:
                        break
                    if pool[j].strip() not in avoid:
                        chosen.append(j)
                        avoid.add(pool[j].strip())
                        summary.backfilled += 1
        if len(chosen) < count:
            summary.short += 1
    return chosen
