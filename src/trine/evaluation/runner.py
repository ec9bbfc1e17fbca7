"""Evaluate one or several models on a test set in every retrieval mode.

Modes (as BGE-M3's evaluation, see FlagEmbedding's MLDR/MKQA recipes):

- ``dense``: exact inner-product search (FAISS flat), top ``top_k``;
- ``sparse``: the inverted lexical index, top ``top_k``;
- ``colbert``: exact maxsim re-ranking of the dense top ``rerank_k`` (``colbert_search="rerank"``,
  FlagEmbedding's recipe) or exact maxsim over the whole corpus (``"full"``, small corpora);
- ``sparse+dense`` (alias ``dense+sparse``): the union of dense and sparse top ``top_k``, every
  candidate scored exactly in both modes, ranked by ``w_d * s_d + w_s * s_s``
  (``weights_dense_sparse``, default (1, 0.3));
- ``colbert+sparse+dense`` (alias ``all``): the same union scored exactly in all three modes
  (``weights_all``, default (1, 0.3, 1));
- ``rrf``: reciprocal-rank fusion of the dense, sparse and (union re-ranked) multi-vector lists;
- ``bm25``: the classical baseline, no model output: BM25 over the corpus texts through ``bm25s``
  (English stop-words, English Snowball stemmer, bm25s's defaults ``method="lucene"``, k1=1.5,
  b=0.75; :class:`~trine.retrieval.BM25Index`), top ``top_k``. Not among the default modes.

With a cross-encoder (``reranker``), each mode in ``rerank_modes`` is also reported re-ranked:
its top ``reranker_top_k`` scored by the cross-encoder, as ``rerank(<mode>)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trine.evaluation.data import RetrievalDataset
from trine.evaluation.metrics import DEFAULT_K, DEFAULT_METRICS, evaluate_run
from trine.inference.embedder import M3Embedder
from trine.inference.encoder import Encoder
from trine.inference.reranker import Reranker
from trine.modeling.trihead import TriHeadModel
from trine.retrieval import BM25Index, HybridRetriever, QueryReps, SearchResult
from trine.retrieval.base import pad_results
from trine.scoring import HYBRID_KEYS, MODE_ALIASES, canonical_mode

logger = logging.getLogger(__name__)

# FlagEmbedding's score-mode names (trine.scoring.HYBRID_KEYS; the old eval names are aliases), and rrf
MODES = (*HYBRID_KEYS, "rrf", "bm25")
DEFAULT_MODES = HYBRID_KEYS
_NEEDS = {
    "dense": {"dense"},
    "sparse": {"sparse"},
    "colbert": {"dense", "colbert"},
    "sparse+dense": {"dense", "sparse"},
    "colbert+sparse+dense": {"dense", "sparse", "colbert"},
    "rrf": {"dense", "sparse", "colbert"},
    "bm25": set(),  # the texts themselves
}


@dataclass
class EvalConfig:
    modes: Sequence[str] = DEFAULT_MODES
    k_values: Sequence[int] = DEFAULT_K
    metrics: Sequence[str] = DEFAULT_METRICS
    top_k: int = 100
    rerank_k: int = 100
    colbert_search: str = "rerank"
    weights_dense_sparse: Sequence[float] = (1.0, 0.3)
    weights_all: Sequence[float] = (1.0, 0.3, 1.0)
    rrf_k: float = 60.0
    dense_index: str = "flat"
    ignore_identical_ids: bool = False
    batch_size: int | None = None
    query_max_length: int = 64
    passage_max_length: int = 512
    rerank_modes: Sequence[str] = ()
    reranker_top_k: int = 100
    reranker_max_length: int = 512
    reranker_query_max_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if MODE_ALIASES.get(m, m) not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown modes {bad}; choose from {MODES} (aliases: {', '.join(MODE_ALIASES)})")
        self.modes = tuple(canonical_mode(m, MODES) for m in self.modes)
        self.rerank_modes = tuple(canonical_mode(m, MODES) for m in self.rerank_modes)
        if self.colbert_search not in ("rerank", "full"):
            raise ValueError(f"colbert_search must be 'rerank' or 'full', not {self.colbert_search!r}")
        if len(self.weights_dense_sparse) != 2:
            raise ValueError("weights_dense_sparse needs 2 values (dense, sparse)")
        if len(self.weights_all) != 3:
            raise ValueError("weights_all needs 3 values (dense, sparse, colbert)")
        if self.top_k < max(self.k_values):
            raise ValueError(f"top_k ({self.top_k}) must be at least the largest k ({max(self.k_values)})")
        if self.rerank_k < 1:
            raise ValueError(f"rerank_k must be positive, got {self.rerank_k}")
        for name in ("top_k", "query_max_length", "passage_max_length", "reranker_top_k", "reranker_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (or None for the model's), got {self.batch_size}")
        outside = [m for m in self.rerank_modes if m not in self.modes]
        if outside:
            raise ValueError(f"rerank_modes {outside} are not among the evaluated modes {list(self.modes)}")
        if self.rerank_modes and self.reranker_top_k < max(self.k_values):
            raise ValueError(f"reranker_top_k ({self.reranker_top_k}) must be at least the largest k "
                             f"({max(self.k_values)})")


def needed_outputs(modes: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for m in modes:
        out |= _NEEDS[m]
    return out


Timed = tuple[SearchResult, float]


def search_modes(retriever: HybridRetriever | None, reps: QueryReps, config: EvalConfig,
                 bm25: tuple[BM25Index, Sequence[str]] | None = None) -> dict[str, Timed]:
    """Run every configured mode; ``{mode: (result, seconds)}``. ``bm25``: the BM25 index over the
    corpus texts and the query texts (needed for mode ``bm25``)."""
    out: dict[str, Timed] = {}
    k = config.top_k
    w_ds, w_all = config.weights_dense_sparse, config.weights_all
    for mode in config.modes:
        start = time.perf_counter()
        if mode == "bm25":
            if bm25 is None:
                raise ValueError("mode 'bm25' needs the BM25 index and the query texts")
            res = bm25[0].search(bm25[1], k)
        elif retriever is None:
            raise ValueError(f"mode {mode!r} needs the model's index")
        elif mode in ("dense", "sparse"):
            res = retriever.first_stage(reps, mode, k)
        elif mode == "colbert":
            if config.colbert_search == "full":
                res = retriever.first_stage(reps, "colbert", k)
            else:
                candidates = retriever.first_stage(reps, "dense", config.rerank_k)
                res = retriever.multivector.rerank(reps.colbert_vecs, candidates, min(k, config.rerank_k))
        elif mode == "sparse+dense":
            res = retriever.search(reps, k, {"dense": w_ds[0], "sparse": w_ds[1]}, candidate_k=k)
        elif mode == "colbert+sparse+dense":
            res = retriever.search(reps, k, {"dense": w_all[0], "sparse": w_all[1], "colbert": w_all[2]},
                                   candidate_k=k)
        else:
            res = retriever.search(reps, k, {"dense": 1.0, "sparse": 1.0, "colbert": 1.0}, candidate_k=k,
                                   fusion="rrf", rrf_k=config.rrf_k)
        out[mode] = (res, time.perf_counter() - start)
    return out


def rerank_result(reranker: Reranker, result: SearchResult, queries: Sequence[str], docs: Sequence[str],
                  config: EvalConfig) -> SearchResult:
    """Score each query's top ``reranker_top_k`` with the cross-encoder (all pairs in one batched
    call) and order them by that score."""
    top = min(config.reranker_top_k, result.rows.shape[1])
    pairs, owners = [], []
    for qi, rows in enumerate(result.rows[:, :top]):
        for r in rows[rows >= 0].tolist():
            pairs.append((queries[qi], docs[r]))
            owners.append((qi, r))
    scores = reranker.compute_score(pairs, max_length=config.reranker_max_length,
                                    query_max_length=config.reranker_query_max_length) if pairs else []
    per_query: list[list[tuple[float, int]]] = [[] for _ in range(len(result))]
    for (qi, r), s in zip(owners, scores):
        per_query[qi].append((s, r))
    ordered = []
    for items in per_query:
        items.sort(key=lambda x: -x[0])
        ordered.append((np.array([s for s, _ in items], dtype=np.float32), np.array([r for _, r in items])))
    return pad_results(ordered, top)


def evaluate_model(model: Encoder, dataset: RetrievalDataset, config: EvalConfig,
                   reranker: Reranker | None = None, *, return_runs: bool = False) -> dict[str, Any]:
    """Encode corpus and queries once, search every mode (and re-rank the ``rerank_modes`` with the
    cross-encoder), score with pytrec_eval. ``return_runs``: also ``{"runs": {mode: {qid: {doc_id:
    score}}}}``, each mode's ranked lists as scored."""
    if config.rerank_modes and reranker is None:
        raise ValueError("rerank_modes are set but no reranker is given")
    needs = needed_outputs(config.modes)
    doc_ids, texts = dataset.passages()
    query_ids = list(dataset.queries)
    query_texts = [dataset.queries[q] for q in query_ids]
    encode_corpus_s = encode_queries_s = index_s = 0.0
    retriever, reps = None, QueryReps()
    if needs:  # bm25 alone needs no model output
        start = time.perf_counter()
        docs = model.encode_result(texts, needs, kind="passage", batch_size=config.batch_size,
                                   max_length=config.passage_max_length)
        encode_corpus_s = time.perf_counter() - start
        start = time.perf_counter()
        queries = model.encode_result(query_texts, needs, kind="query", batch_size=config.batch_size,
                                      max_length=config.query_max_length)
        encode_queries_s = time.perf_counter() - start
        start = time.perf_counter()
        retriever = HybridRetriever.from_encoded({k: v for k, v in docs.items() if v is not None}, doc_ids,
                                                 dense_kind=config.dense_index)
        index_s = time.perf_counter() - start
        reps = QueryReps.from_encode(queries)
    bm25 = None
    if "bm25" in config.modes:
        start = time.perf_counter()
        bm25 = (BM25Index.build(texts, doc_ids), query_texts)
        index_s += time.perf_counter() - start
    metrics: dict[str, dict[str, float]] = {}
    search_s: dict[str, float] = {}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    results = search_modes(retriever, reps, config, bm25)
    for mode in config.rerank_modes:
        start = time.perf_counter()
        reranked = rerank_result(reranker, results[mode][0], query_texts, texts, config)
        results[f"rerank({mode})"] = (reranked, results[mode][1] + time.perf_counter() - start)
    for mode, (res, seconds) in results.items():
        run = res.to_run(query_ids, doc_ids)
        metrics[mode] = evaluate_run(dataset.qrels, run, config.k_values, config.metrics,
                                     ignore_identical_ids=config.ignore_identical_ids)
        search_s[mode] = seconds
        if return_runs:
            runs[mode] = run
    out: dict[str, Any] = {
        "metrics": metrics,
        "timings": {"encode_corpus_s": encode_corpus_s, "encode_queries_s": encode_queries_s, "index_s": index_s,
                    "search_s": search_s},
    }
    if return_runs:
        out["runs"] = runs
    return out


def load_embedder(path: str | os.PathLike, config: EvalConfig, options: Mapping[str, Any] | None) -> M3Embedder:
    """``M3Embedder(path, **options)``; when at most dense scores are needed and no head start is
    asked for, the heads are not loaded (a plain dense model needs none)."""
    options = dict(options or {})
    if needed_outputs(config.modes) <= {"dense"} and options.get("init_missing_heads") is None:
        options.pop("init_missing_heads", None)
        return M3Embedder(TriHeadModel.from_pretrained(path, with_heads=False), **options)
    return M3Embedder(path, **options)


def model_labels(models: Sequence[str | os.PathLike | Encoder]) -> list[str]:
    """Short unique names: the folder name, or as many trailing path parts as it takes to tell it apart."""
    parts = [os.path.normpath(os.fspath(m)).strip(os.sep).split(os.sep) if not isinstance(m, Encoder) else None
             for m in models]
    labels = []
    for i, p in enumerate(parts):
        if p is None:
            labels.append(f"{type(models[i]).__name__}#{i + 1}")
            continue
        others = [q for j, q in enumerate(parts) if j != i and q is not None and q != p]
        depth = 1
        while depth < len(p) and any(q[-depth:] == p[-depth:] for q in others):
            depth += 1
        labels.append("/".join(p[-depth:]))
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # the same path given twice
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


def run_evaluation(
    models: Sequence[str | os.PathLike | Encoder],
    dataset: RetrievalDataset,
    config: EvalConfig | None = None,
    *,
    model_options: Mapping[str, Any] | None = None,
    reranker: str | os.PathLike | Reranker | None = None,
    reranker_options: Mapping[str, Any] | None = None,
    return_runs: bool = False,
) -> dict[str, Any]:
    """Evaluate every model; paths are loaded with ``M3Embedder(path, **model_options)``; a
    reranker path with ``Reranker(path, **reranker_options)``. ``return_runs`` keeps each mode's
    ranked lists (``"runs"`` beside ``"metrics"``).

    Returns ``{"dataset", "split", "queries", "documents", "config", "models": {label: {"path",
    "metrics": {mode: {metric: value}}, "timings"}}}``.
    """
    config = config or EvalConfig()
    if not models:
        raise ValueError("no models to evaluate")
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "split": dataset.split,
        "queries": len(dataset.queries),
        "documents": len(dataset.corpus),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "models": {},
    }
    if reranker is not None and not isinstance(reranker, Reranker):
        result["reranker"] = os.fspath(reranker)
        reranker = Reranker(reranker, **(reranker_options or {}))
    for model, label in zip(models, model_labels(models)):
        embedder = model if isinstance(model, Encoder) else load_embedder(model, config, model_options)
        logger.info("evaluating %s on %s (%d queries, %d documents)", label, dataset.name, len(dataset.queries),
                    len(dataset.corpus))
        out = evaluate_model(embedder, dataset, config, reranker, return_runs=return_runs)
        result["models"][label] = {"path": os.fspath(model) if not isinstance(model, Encoder) else None, **out}
    return result


def main_metric_table(result: Mapping[str, Any], metrics: Sequence[str]) -> list[list[str]]:
    """Rows ``[model, mode, metric values...]`` as strings (4 decimals)."""
    rows = []
    for label, entry in result["models"].items():
        for mode, values in entry["metrics"].items():
            rows.append([label, mode] + [f"{values[m]:.4f}" if m in values else "" for m in metrics])
    return rows
