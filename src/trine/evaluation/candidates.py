"""The corpus encoded once and each query set's candidates scored once per head.

:func:`index_corpus` encodes a corpus with the outputs the modes need and indexes it (a
:class:`CorpusIndex`, shared by tuning on the dev split and evaluation on the test split).
:class:`ScoredCandidates` holds one query set's first-stage lists (dense, sparse, BM25: each searched
once) and, per head (``dense``, ``sparse``, ``colbert``, ``bm25``), its exact score of every candidate any
mode needs from it (scored once, over the union of the lists those modes draw on). Every mode of an
evaluation (the ColBERT re-ranking of the dense list, each weighted fusion, rrf) and every weighting the
tuning grid tries is then ranked from these scores: a mode or a grid point scores nothing again. The
numbers are those of the retriever's own path (``HybridRetriever.search_mode``): the same lists, the
same exact scores (looked up, not recomputed), the same fusion formula and tie rule.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trine.evaluation.config import EvalConfig, config_outputs, uses_bm25
from trine.evaluation.data import RetrievalDataset
from trine.inference.encoder import Encoder
from trine.modeling.fusion import FUSED_MODES
from trine.progress import step
from trine.retrieval import BM25Index, HybridRetriever, QueryReps, SearchResult, union_rows, weighted_fusion
from trine.retrieval.base import unique_rows
from trine.retrieval.hybrid import Scorer, rank_candidates, reciprocal_rank_fusion

#: the first-stage lists each fused mode takes the union of (the rest of its parts are scored on it)
FIRST_STAGES = {"sparse+dense": ("dense", "sparse"), "colbert+sparse+dense": ("dense", "sparse"),
                "dense+bm25": ("dense", "bm25"), "rrf": ("dense", "sparse")}


@dataclass
class CorpusIndex:
    """A corpus encoded once by one model and indexed, shared by tuning and evaluation: the model's
    indexes (``retriever``, for the outputs in ``needs``) and the BM25 index over the texts (``bm25``),
    each ``None`` when no mode asked for it; ``dense_vecs``: the corpus's full dense vectors, kept for
    the Matryoshka ``dims``."""

    doc_ids: list[str]
    texts: list[str]
    needs: set[str]
    retriever: HybridRetriever | None = None
    bm25: BM25Index | None = None
    dense_vecs: np.ndarray | None = None
    encode_s: float = 0.0
    index_s: float = 0.0

    def check(self, dataset: RetrievalDataset, needs: set[str], with_bm25: bool) -> None:
        """Raise unless this index covers ``dataset``'s corpus (same ids, same order) and the outputs asked for."""
        if list(dataset.corpus) != self.doc_ids:
            raise ValueError(f"the encoded corpus is not the corpus of {dataset.name!r} ({dataset.split}): "
                             "splits must come from the same data folder")
        if not needs <= self.needs:
            raise ValueError(f"the encoded corpus lacks the outputs {sorted(needs - self.needs)}")
        if with_bm25 and self.bm25 is None:
            raise ValueError("the encoded corpus has no BM25 index")


def index_corpus(model: Encoder, dataset: RetrievalDataset, config: EvalConfig) -> CorpusIndex:
    """Encode ``dataset``'s corpus once with the outputs the config's modes need and index it (and
    build the BM25 index when a mode uses it)."""
    doc_ids, texts = dataset.passages()
    needs = config_outputs(config)
    corpus = CorpusIndex(doc_ids, texts, needs)
    if needs:  # bm25 alone needs no model output
        step(f"  encoding {len(texts)} passages ({', '.join(sorted(needs))})")
        start = time.perf_counter()
        docs = model.encode_result(texts, needs, kind="passage", batch_size=config.batch_size,
                                   max_length=config.passage_max_length)
        corpus.encode_s = time.perf_counter() - start
        if config.dims:
            check_dims(config.dims, docs.dense_vecs.shape[1])
            corpus.dense_vecs = docs.dense_vecs
        step(f"  indexing {len(texts)} passages ({config.backend} {config.dense_index})")
        start = time.perf_counter()
        encoded = {k: v for k, v in docs.items() if v is not None}
        if config.backend == "trine":
            corpus.retriever = HybridRetriever.from_encoded(
                encoded, doc_ids, dense_kind=config.dense_index, colbert_kind=config.colbert_index,
                colbert_options=config.colbert_index_options)
        else:
            corpus.retriever = backend_retriever(model, encoded, doc_ids, config)
        corpus.index_s = time.perf_counter() - start
    if uses_bm25(config.modes):
        step(f"  BM25 index of {len(texts)} passages")
        start = time.perf_counter()
        corpus.bm25 = BM25Index.build(texts, doc_ids)
        corpus.index_s += time.perf_counter() - start
    return corpus


def backend_retriever(model: Encoder, docs: dict[str, Any], doc_ids: list[str], config: EvalConfig
                      ) -> HybridRetriever:
    """The corpus in a vector-database collection (``config.backend``), searched through its Index views."""
    import hashlib

    from trine.retrieval.vectordb import collection_retriever

    name_or_path = str(getattr(model.tokenizer, "name_or_path", "") or type(model).__name__)
    name = config.collection or "trine_eval_" + hashlib.sha1(
        "\n".join([name_or_path, *doc_ids]).encode()).hexdigest()[:12]
    return collection_retriever(config.backend, docs, doc_ids, name=name, uri=config.backend_uri,
                                dense_index=config.dense_index, tokenizer=model.tokenizer, model=name_or_path)


def check_dims(dims: Sequence[int], full_dim: int) -> None:
    too_big = [d for d in dims if d > full_dim]
    if too_big:
        raise ValueError(f"dims {too_big} exceed the model's dense size {full_dim}")


def encode_queries(model: Encoder, texts: Sequence[str], needs: set[str], config: EvalConfig) -> QueryReps:
    if not needs:
        return QueryReps()
    return QueryReps.from_encode(model.encode_result(list(texts), needs, kind="query", batch_size=config.batch_size,
                                                     max_length=config.query_max_length))


ListKey = tuple[str, int]


def candidate_plan(modes: Sequence[str], config: EvalConfig) -> tuple[list[ListKey], dict[str, set[ListKey]]]:
    """Which first-stage lists ``(mode, k)`` the ``modes`` need, and for each head the lists whose union
    of rows it must score. ``colbert`` with ``colbert_search="full"`` searches the corpus itself (no list)."""
    k, r = config.top_k, config.rerank_k
    lists: dict[ListKey, None] = {}
    parts: dict[str, set[ListKey]] = {}

    def need(part: str, *keys: ListKey) -> None:
        parts.setdefault(part, set()).update(keys)
        lists.update(dict.fromkeys(keys))

    for mode in modes:
        if mode in ("dense", "sparse", "bm25"):
            lists[(mode, k)] = None
        elif mode == "colbert":
            if config.colbert_search == "rerank":
                need("colbert", ("dense", r))
        elif mode in FIRST_STAGES:
            keys = [(m, k) for m in FIRST_STAGES[mode]]
            for part in FUSED_MODES.get(mode, ("colbert",)):  # rrf: colbert re-ranks the union
                need(part, *keys)
            lists.update(dict.fromkeys(keys))
        else:
            raise ValueError(f"no candidate plan for mode {mode!r}")
    return list(lists), parts


@dataclass
class ScoredCandidates:
    """One query set's first-stage lists and each head's exact scores of its candidates (see the module).

    ``lists``: ``{(mode, k): SearchResult}``; ``rows[part]`` (queries x m, sorted, -1 padding): the
    candidates ``part`` scored, ``scores[part]`` their scores (as the index's ``score`` gives them,
    -inf on padding); ``seconds``: the time of each first stage (``"dense@100"``) and each head's scoring."""

    lists: dict[ListKey, SearchResult]
    rows: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    _keys: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, corpus: CorpusIndex, reps: QueryReps, query_texts: Sequence[str], modes: Sequence[str],
              config: EvalConfig) -> ScoredCandidates:
        """Search each list the ``modes`` need once and score each head on the union of its lists once."""
        wanted, parts = candidate_plan(modes, config)
        out = cls({}, {}, {})
        for mode, k in wanted:
            start = time.perf_counter()
            if mode == "bm25":
                if corpus.bm25 is None:
                    raise ValueError("mode 'bm25' needs the BM25 index and the query texts")
                out.lists[(mode, k)] = corpus.bm25.search(list(query_texts), k)
            else:
                if corpus.retriever is None:
                    raise ValueError(f"mode {mode!r} needs the model's index")
                out.lists[(mode, k)] = corpus.retriever.first_stage(reps, mode, k)
            out.seconds[f"{mode}@{k}"] = time.perf_counter() - start
        for part, keys in parts.items():
            start = time.perf_counter()
            rows = union_rows([out.lists[key] for key in sorted(keys)])
            if part == "bm25":
                scores = corpus.bm25.score(list(query_texts), rows)
            else:
                scores = corpus.retriever.scorer(reps, part)(rows)
            out.rows[part], out.scores[part] = rows, np.asarray(scores)
            out.seconds[f"score {part}"] = time.perf_counter() - start
        return out

    def first_stage(self, mode: str, k: int) -> SearchResult:
        if (mode, k) not in self.lists:
            raise ValueError(f"no first-stage list {mode} top {k} among the scored candidates")
        return self.lists[(mode, k)]

    def _lookup_keys(self, part: str) -> np.ndarray:
        """Each cached (query, row) as one sorted integer: query * (width) + row; padding sorts last."""
        if part not in self._keys:
            rows = self.rows[part]
            width = int(rows.max(initial=-1)) + 2
            q = np.arange(rows.shape[0], dtype=np.int64)[:, None] * width
            self._keys[part] = (q + np.where(rows >= 0, rows, width - 1)).ravel()
        return self._keys[part]

    def scorer(self, part: str) -> Scorer:
        """``part``'s cached exact scores of any (queries x m) rows among its candidates (-1: -inf); rows
        it did not score are an error, never scored silently."""
        if part not in self.scores:
            raise ValueError(f"the candidates were not scored by {part!r} (scored: {sorted(self.scores)})")
        cached_rows, cached = self.rows[part], self.scores[part]

        def lookup(rows: np.ndarray) -> np.ndarray:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 2 or rows.shape[0] != cached_rows.shape[0]:
                raise ValueError(f"rows must be (queries x m) with {cached_rows.shape[0]} queries, got {rows.shape}")
            keys = self._lookup_keys(part)
            width = int(cached_rows.max(initial=-1)) + 2
            valid = rows >= 0
            want = np.arange(rows.shape[0], dtype=np.int64)[:, None] * width + np.where(valid, rows, 0)
            pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
            found = keys[pos] == want
            if not (found | ~valid).all() or (valid & (rows >= width - 1)).any():
                raise ValueError(f"rows outside the candidates {part!r} scored")
            out = np.full(rows.shape, -np.inf, dtype=cached.dtype)
            out[valid] = cached.ravel()[pos[valid]]
            return out
        return lookup

    def fuse(self, mode: str, weights: Sequence[float], k: int, normalization: str = "none",
             confidence: Sequence[float] | None = None) -> SearchResult:
        """A fused mode's best ``k`` (:func:`trine.retrieval.weighted_fusion` of its first-stage lists, each
        head's cached scores weighted by ``weights`` in :data:`trine.modeling.fusion.FUSED_MODES` order;
        ``confidence``: calibrated fusion's coefficients in that order, ``None`` for plain weights)."""
        lists = [self.first_stage(m, k) for m in FIRST_STAGES[mode]]
        return weighted_fusion(lists, [self.scorer(p) for p in FUSED_MODES[mode]], weights, k,
                               normalization=normalization, confidence=confidence)

    def rrf(self, k: int, rrf_k: float) -> SearchResult:
        """Reciprocal-rank fusion of the dense, sparse and (their union re-ranked) colbert lists, weights 1:
        ``HybridRetriever.search(fusion="rrf")`` over the cached scores."""
        lists = [self.first_stage(m, k) for m in FIRST_STAGES["rrf"]]
        rows = union_rows(lists)
        colbert = rank_candidates(rows, self.scorer("colbert")(rows), max(rows.shape[1], 1))
        return reciprocal_rank_fusion([*lists, colbert], k, rrf_k, [1.0, 1.0, 1.0])

    def rerank(self, part: str, candidates: SearchResult, k: int) -> SearchResult:
        """``candidates``' rows (duplicates and -1 ignored) ordered by ``part``'s cached scores, best ``k``:
        :func:`trine.retrieval.protocol.rerank` without scoring."""
        rows = unique_rows(candidates.rows)
        return rank_candidates(rows, self.scorer(part)(rows), k)

