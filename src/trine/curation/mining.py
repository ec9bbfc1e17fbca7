"""`trine mine`: hard negatives for a training file from an index over a candidate pool.

For each record: search the pool for the query (with its instruction), take the candidates
ranked in ``range_for_sampling`` (0-based, end exclusive, as FlagEmbedding's ``2-100``), drop
positives, the query itself and duplicates, optionally drop likely false negatives (score above
``(1 - relative_margin) x`` the lowest positive score), and sample ``negative_number`` of what
remains.

Ranking is dense (exact FAISS inner product by default; ``index_kind`` "hnsw" or "ivf" for an
approximate index) or, for M3 models, hybrid: ``w_dense * dense + w_sparse * lexical`` scored
exactly over the union of the dense and the sparse top ``hybrid_candidates`` (FlagEmbedding's
MLDR recipe, through :class:`trine.retrieval.HybridRetriever`), or, for M3 models, ColBERT maxsim over the
pool's multi-vectors (``colbert_index``: ``exact`` scans every passage, ``plaid`` searches the compressed
index of :mod:`trine.retrieval.plaid` with its own candidate generation, for large pools).

Memory: the pool's encodings live once, inside the indexes (optionally read from an on-disk
cache, :mod:`trine.curation.cache`). Queries are encoded ``query_chunk_size`` at a time and
searched ``search_batch_size`` at a time, and output rows are written as they are made, so the
rest is a bounded working set: never a queries x pool matrix, never all query embeddings.

Here: the options, the pass over the queries and the summary. The pool is read by
:func:`trine.data.corpus.read_pool`, ranked by :mod:`trine.curation.ranking`, and each query's
negatives are sampled by :mod:`trine.curation.sampling`.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trine.curation.cache import CorpusEncodings
from trine.curation.common import (
    atomic_jsonl,
    check_output,
    iter_raw_rows,
    percentiles,
    quiet,
    read_records,
    write_row,
)
from trine.curation.ranking import ColbertPoolRanker, PoolRanker, positive_scores
from trine.curation.sampling import BACKFILL, SamplingCounts, pick_negatives
from trine.data.corpus import read_pool
from trine.data.records import Record
from trine.inference.result import EncodeResult
from trine.progress import bar as progress_bar
from trine.retrieval.dense import DENSE_KINDS, DenseIndex
from trine.retrieval.hybrid import QueryReps
from trine.retrieval.sparse import SparseIndex
from trine.scoring import check_normalization

logger = logging.getLogger(__name__)

INDEX_OPTIONS = ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe")
COLBERT_INDEXES = ("exact", "plaid")


@dataclass
class MiningSummary(SamplingCounts):
    records: int = 0
    pool: int = 0
    ranking: str = "dense"
    index_kind: str = "flat"
    cache: str = "off"
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


def _encode(embedder: Any, texts: list[str], kind: str, outputs: Sequence[str]) -> QueryReps:
    return QueryReps.from_encode(embedder.encode_result(texts, outputs, kind=kind))


def _rows(reps: QueryReps, start: int, stop: int) -> QueryReps:
    """Queries ``start:stop`` of ``reps`` (every representation it holds)."""
    return QueryReps(*(None if x is None else x[start:stop]
                       for x in (reps.dense_vecs, reps.lexical_weights, reps.colbert_vecs)))


def _pool_collection(corpus: CorpusEncodings, pool: list[str], embedder: Any, backend: str, uri: str | None,
                     name: str | None, index_kind: str, hybrid: bool) -> tuple[Any, Any]:
    """The pool in a vector-database collection, block by block (rows: pool positions); its dense and sparse views."""
    import hashlib

    from trine.retrieval.vectordb import CollectionMismatchError, collection_class, connection_of, signature_of

    if index_kind not in ("flat", "hnsw"):
        raise ValueError(f"index_kind {index_kind!r}: the {backend} backend has 'flat' and 'hnsw'")
    ids = [hashlib.sha1(t.encode()).hexdigest()[:20] for t in pool]
    name = name or "trine_pool_" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
    collection = None
    start = 0
    for block in corpus.blocks():
        docs = {k: block[k] for k in ("dense_vecs", "lexical_weights") if k == "dense_vecs" or hybrid}
        if collection is None:
            collection = collection_class(backend).create(
                name, representations=("dense", "sparse") if hybrid else ("dense",), exist_ok=True,
                signature=signature_of(docs, embedder.tokenizer if hybrid else None), dense_index=index_kind,
                store_text=False, **connection_of(backend, uri, default_key=name))
        count = len(block["dense_vecs"])
        collection.upsert(docs, ids[start:start + count])
        start += count
    if collection is None or collection.ids != ids:
        raise CollectionMismatchError(f"{backend} collection {name!r} holds other passages than this pool; use "
                                      "another collection name, or drop it")
    return collection.index("dense"), collection.index("sparse") if hybrid else None


class GivenEncodings:
    """A pool's encodings made elsewhere, read as :class:`CorpusEncodings` reads its blocks; each block must
    hold the ``outputs`` asked for, and the blocks together one row per pool text (checked as they are read)."""

    status = "given"

    def __init__(self, blocks: Iterable[EncodeResult], count: int, outputs: Sequence[str]):
        self._blocks, self.count, self.outputs = blocks, count, tuple(outputs)

    def blocks(self) -> Iterator[EncodeResult]:
        rows = 0
        for block in self._blocks:
            dense = block.dense_vecs
            if dense is None or ("sparse" in self.outputs and block.lexical_weights is None) or \
                    ("colbert" in self.outputs and block.colbert_vecs is None):
                raise ValueError(f"the given pool encodings lack outputs {list(self.outputs)}")
            if ("sparse" in self.outputs and len(block.lexical_weights) != len(dense)) or \
                    ("colbert" in self.outputs and len(block.colbert_vecs) != len(dense)):
                raise ValueError("the given pool encodings have unequal numbers of dense, lexical or colbert rows")
            rows += len(dense)
            if rows > self.count:
                break
            yield block
        if rows != self.count:
            raise ValueError(f"{rows if rows <= self.count else 'more'} pool encodings given for a pool of "
                             f"{self.count} texts")


class NegativeMiner:
    """The selection rule of `trine mine`, apart from any file: the options are checked when it is
    made; :meth:`mine` indexes a pool and picks each record's negatives. `trine mine`
    (:func:`mine_hard_negatives`) and dynamic negatives during fine-tuning
    (:mod:`trine.training.dynamic_negatives`) both go through it. The options are
    :func:`mine_hard_negatives`'s."""

    def __init__(
        self,
        embedder: Any,  # a trine encoder: Embedder, or M3Embedder for hybrid ranking
        *,
        range_for_sampling: tuple[int, int] = (2, 100),
        negative_number: int = 15,
        relative_margin: float | None = None,
        backfill: str = "random",
        search_batch_size: int = 256,
        seed: int = 42,
        hybrid_weights: Sequence[float] | None = None,
        hybrid_candidates: int | None = None,
        hybrid_normalization: str = "none",
        index_kind: str = "flat",
        index_options: dict[str, int] | None = None,
        cache_dir: str | None = None,
        query_chunk_size: int = 2048,
        corpus_block_size: int = 16384,
        show_progress: bool = True,
        backend: str = "trine",
        backend_uri: str | None = None,
        collection: str | None = None,
        colbert_index: str | None = None,
        colbert_options: dict[str, Any] | None = None,
    ):
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
            if "sparse" not in embedder.outputs:
                raise ValueError("hybrid ranking needs lexical weights: load the model with its BGE-M3 heads "
                                 "(an M3Embedder)")
            weights = (float(hybrid_weights[0]), float(hybrid_weights[1]))
        elif hybrid_candidates is not None:
            raise ValueError("hybrid_candidates goes with hybrid_weights")
        check_normalization(hybrid_normalization)
        if hybrid_normalization != "none":
            if not hybrid:
                raise ValueError("hybrid_normalization goes with hybrid_weights")
            if relative_margin is not None:
                raise ValueError("relative_margin compares a candidate's score with the positives' raw scores; with "
                                 f"hybrid_normalization={hybrid_normalization!r} the ranking scores are normalised "
                                 "per query and not comparable: use hybrid_normalization='none'")
        if hybrid_candidates is not None and int(hybrid_candidates) < 1:
            raise ValueError(f"hybrid_candidates must be positive, got {hybrid_candidates}")
        colbert_options = dict(colbert_options or {})
        if colbert_index is not None:
            if colbert_index not in COLBERT_INDEXES:
                raise ValueError(f"colbert_index must be one of {COLBERT_INDEXES}, got {colbert_index!r}")
            if hybrid:
                raise ValueError("colbert_index ranks by ColBERT maxsim alone: not with hybrid_weights")
            if backend != "trine" or index_kind != "flat" or options:
                raise ValueError("colbert_index ranks with trine's multi-vector indexes: the dense index options "
                                 "(backend, index_kind, index_options) do not apply")
            if "colbert" not in embedder.outputs:
                raise ValueError("ColBERT ranking needs multi-vectors: load the model with its BGE-M3 heads "
                                 "(an M3Embedder)")
            if colbert_index == "plaid":
                from trine.retrieval.plaid import check_options

                check_options(colbert_options)  # an unknown option or a bad value raises before encoding
        if colbert_options and colbert_index != "plaid":
            raise ValueError(f"colbert_options {sorted(colbert_options)} are the plaid index's (colbert_index is "
                             f"{colbert_index!r})")
        self.colbert_index, self.colbert_options = colbert_index, colbert_options
        self.embedder, self.range_for_sampling, self.negative_number = embedder, range_for_sampling, negative_number
        self.relative_margin, self.backfill, self.search_batch_size, self.seed = (relative_margin, backfill,
                                                                                  search_batch_size, seed)
        self.hybrid, self.weights, self.hybrid_candidates = hybrid, weights, hybrid_candidates
        self.hybrid_normalization, self.index_kind, self.index_options = hybrid_normalization, index_kind, options
        self.cache_dir, self.query_chunk_size, self.corpus_block_size = cache_dir, query_chunk_size, corpus_block_size
        self.show_progress, self.backend, self.backend_uri, self.collection = (show_progress, backend, backend_uri,
                                                                               collection)

    def mine(self, records: Sequence[Record], pool: Sequence[str],
             encodings: Iterable[EncodeResult] | None = None) -> tuple[MiningSummary, Iterator[list[int]]]:
        """Index ``pool`` (distinct texts) now; return the summary and an iterator over each record's
        negatives (rows of ``pool``), in record order. The summary's counts, scores and query time fill
        in as the iterator runs; record i samples with ``numpy.random.default_rng([seed, i])``.

        ``encodings``: the pool's passage encodings made elsewhere with this embedder (blocks in pool
        order: dense vectors, and lexical weights for hybrid ranking), indexed instead of encoding the
        pool here (dynamic negatives under DDP gather them from every rank's shard); their row count
        must be the pool's."""
        pool = list(pool)
        embedder, hybrid, weights = self.embedder, self.hybrid, self.weights
        if self.colbert_index is not None:
            ranking = "colbert maxsim"
        elif hybrid:
            ranking = f"hybrid dense x {weights[0]} + sparse x {weights[1]}" + (
                "" if self.hybrid_normalization == "none" else f" ({self.hybrid_normalization})")
        else:
            ranking = "dense"
        summary = MiningSummary(records=len(records), pool=len(pool), ranking=ranking,
                                index_kind=self.colbert_index or self.index_kind)
        position = {t: i for i, t in enumerate(pool)}
        depth = min(self.range_for_sampling[1], len(pool))

        started = time.perf_counter()
        outputs = self.outputs
        if encodings is None:
            corpus = CorpusEncodings(embedder, pool, outputs, self.cache_dir, block_size=self.corpus_block_size)
        else:
            corpus = GivenEncodings(encodings, len(pool), outputs)
        summary.cache = corpus.status
        if self.colbert_index is not None:
            ranker = self._colbert_ranker(corpus, len(pool))
            summary.seconds_corpus = time.perf_counter() - started
            return summary, self._picks(records, pool, position, ranker, depth, summary)
        dense_index: DenseIndex | None = None
        lexical: list[dict[str, float]] = []
        backend = self.backend
        if backend != "trine":
            dense_index, sparse_index = _pool_collection(corpus, pool, embedder, backend, self.backend_uri,
                                                         self.collection, self.index_kind, hybrid)
        # one bar over the pool (encoded or read from the cache, and indexed), block by block
        pool_bar = progress_bar(total=len(pool), desc="index pool", unit="passage",
                                disable=not self.show_progress or backend != "trine")
        for block in corpus.blocks() if backend == "trine" else ():  # block by block: no second copy of the vectors
            if dense_index is None:
                dense_index = DenseIndex(block["dense_vecs"].shape[1], self.index_kind, **self.index_options)
            dense_index.add(block["dense_vecs"])
            if hybrid:
                lexical.extend(block["lexical_weights"])
            pool_bar.update(len(block["dense_vecs"]))
        pool_bar.close()
        if backend == "trine":
            sparse_index = SparseIndex.build(lexical) if hybrid else None
        del lexical
        candidates = depth if self.hybrid_candidates is None else int(self.hybrid_candidates)
        ranker = PoolRanker(dense_index, sparse_index, weights, min(candidates, len(pool)), self.hybrid_normalization)
        summary.seconds_corpus = time.perf_counter() - started
        return summary, self._picks(records, pool, position, ranker, depth, summary)

    @property
    def outputs(self) -> tuple[str, ...]:
        """What the ranking needs encoded (dense always: the pool's encodings and their cache start with it)."""
        if self.colbert_index is not None:
            return ("dense", "colbert")
        return ("dense", "sparse") if self.hybrid else ("dense",)

    def _colbert_ranker(self, corpus: Any, count: int) -> ColbertPoolRanker:
        """The pool's multi-vectors (encoded, or read from the cache) in the ``colbert_index`` index."""
        from trine.retrieval.multivector import MultiVectorIndex

        vecs: list[np.ndarray] = []
        pool_bar = progress_bar(total=count, desc="index pool", unit="passage", disable=not self.show_progress)
        for block in corpus.blocks():
            vecs.extend(block["colbert_vecs"])
            pool_bar.update(len(block["colbert_vecs"]))
        pool_bar.close()
        if self.colbert_index == "plaid":
            from trine.retrieval.plaid import ColbertPlaidIndex

            index = ColbertPlaidIndex.build(vecs, **self.colbert_options)
        else:
            index = MultiVectorIndex.build(vecs)
        return ColbertPoolRanker(index)

    def _picks(self, records: Sequence[Record], pool: list[str], position: dict[str, int],
               ranker: PoolRanker | ColbertPoolRanker, depth: int, summary: MiningSummary) -> Iterator[list[int]]:
        embedder, outputs, lo = self.embedder, self.outputs, self.range_for_sampling[0]
        chunk_size, batch_size, margin = self.query_chunk_size, self.search_batch_size, self.relative_margin
        started = time.perf_counter()
        bar = progress_bar(total=len(records), desc="mine", disable=not self.show_progress, unit="query")
        try:
            with quiet(embedder):
                for c0 in range(0, len(records), chunk_size):
                    chunk = records[c0 : c0 + chunk_size]
                    reps = _encode(embedder, [r.query for r in chunk], "query", outputs)
                    outside = list(dict.fromkeys(t for r in chunk for t in r.pos if t not in position))
                    outside_reps = _encode(embedder, outside, "passage", outputs) if outside else None
                    outside_at = {t: j for j, t in enumerate(outside)}
                    for b0 in range(0, len(chunk), batch_size):
                        batch = chunk[b0 : b0 + batch_size]
                        sub = _rows(reps, b0, b0 + len(batch))
                        result = ranker.search(sub, depth)
                        pos_scores = positive_scores(ranker, sub, batch, position, outside_reps, outside_at)
                        picked = []
                        for j, record in enumerate(batch):
                            i = c0 + b0 + j
                            summary.positive_scores.extend(pos_scores[j])
                            ceiling = None if margin is None else (1 - margin) * min(pos_scores[j])
                            picked.append(pick_negatives(record, pool, result.rows[j, lo:depth],
                                                         result.scores[j, lo:depth], ceiling, self.negative_number,
                                                         np.random.default_rng([self.seed, i]), summary,
                                                         self.backfill))
                        width = max((len(p) for p in picked), default=0)
                        if width:
                            rows = np.full((len(batch), width), -1, dtype=np.int64)
                            for j, p in enumerate(picked):
                                rows[j, : len(p)] = p
                            neg_scores = ranker.score_rows(sub, rows)
                            summary.negative_scores.extend(neg_scores[rows >= 0].astype(np.float32).tolist())
                        yield from picked
                        bar.update(len(batch))
        finally:
            bar.close()
            summary.seconds_queries = time.perf_counter() - started


def mine_hard_negatives(
    input_file: str,
    output_file: str,
    embedder: Any,  # a trine encoder: Embedder, or M3Embedder for hybrid ranking
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
    hybrid_normalization: str = "none",
    index_kind: str = "flat",
    index_options: dict[str, int] | None = None,
    cache_dir: str | None = None,
    query_chunk_size: int = 2048,
    corpus_block_size: int = 16384,
    show_progress: bool = True,
    backend: str = "trine",
    backend_uri: str | None = None,
    collection: str | None = None,
    colbert_index: str | None = None,
    colbert_options: dict[str, Any] | None = None,
) -> MiningSummary:
    """Write ``output_file`` (atomically; never the input) with mined ``neg`` lists.

    ``hybrid_weights=(w_dense, w_sparse)`` ranks by the weighted sum of dense and lexical scores
    (an ``M3Embedder`` is needed); ``hybrid_candidates`` (default: the end of the range) is the
    depth of each first-stage list whose union is re-scored exactly; ``hybrid_normalization``
    (``none``, ``minmax``, ``zscore``: :func:`trine.scoring.normalize_scores`) puts the dense and the
    lexical scores on one scale per query over that union before weighting (``relative_margin``,
    which compares a candidate's score with the positives', needs ``none``). ``cache_dir`` keeps the
    pool's encodings on disk for the next run. The pool is encoded (or read from the cache)
    ``corpus_block_size`` passages at a time; an IVF index trains on the first block. ``backend``
    ``"milvus"`` or ``"qdrant"``: the pool is indexed in that database (``backend_uri``; collection
    ``collection``, default ``trine_pool_<hash of the pool>``, ids: hashes of the texts) and ranked
    through its Index views, exactly as over trine's indexes (``index_kind`` flat or hnsw).
    ``colbert_index="exact"`` or ``"plaid"`` ranks by ColBERT maxsim instead (an ``M3Embedder``): over every
    pool passage, or through the compressed index's candidates (``colbert_options``: its build and search
    options, :data:`trine.retrieval.plaid.DEFAULTS`); the scores the margin compares are maxsim too.
    The selection itself is :class:`NegativeMiner`'s.
    """
    check_output([input_file, candidate_pool], output_file)
    miner = NegativeMiner(
        embedder, range_for_sampling=range_for_sampling, negative_number=negative_number,
        relative_margin=relative_margin, backfill=backfill, search_batch_size=search_batch_size, seed=seed,
        hybrid_weights=hybrid_weights, hybrid_candidates=hybrid_candidates, hybrid_normalization=hybrid_normalization,
        index_kind=index_kind, index_options=index_options, cache_dir=cache_dir, query_chunk_size=query_chunk_size,
        corpus_block_size=corpus_block_size, show_progress=show_progress, backend=backend, backend_uri=backend_uri,
        collection=collection, colbert_index=colbert_index, colbert_options=colbert_options,
    )
    records = read_records(input_file)
    if candidate_pool is not None:
        pool = list(dict.fromkeys(read_pool(candidate_pool)))
    else:
        pool = list(dict.fromkeys(t for r in records for t in (*r.pos, *r.neg)))
    summary, picks = miner.mine(records, pool)
    raw_rows = iter_raw_rows(input_file)
    with atomic_jsonl(output_file) as out:
        for picked in picks:
            row = next(raw_rows)
            row["neg"] = [pool[r] for r in picked]
            row.pop("neg_scores", None)  # scores of the old negatives no longer apply
            write_row(out, row)
    return summary
