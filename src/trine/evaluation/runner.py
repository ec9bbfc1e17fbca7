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
- ``dense+bm25``: the union of dense and BM25 top ``top_k``, each candidate scored exactly by both
  (``weights_dense_bm25``, default (1, 1)). Not among the default modes.

The fused modes' weights and the score ``normalization`` (``none``, ``minmax``, ``zscore``, applied
per mode and query over the union of candidates before weighting: :func:`trine.scoring.normalize_scores`)
come, per model and per value, from the config when given there, else from the model folder's
``fusion.json`` (:mod:`trine.modeling.fusion`, written by ``trine eval --tune-weights``), else from
the defaults above (normalization ``none``: FlagEmbedding's raw sums). Each model's result records
which were used and where they came from.
- ``rrf``: reciprocal-rank fusion of the dense, sparse and (union re-ranked) multi-vector lists;
- ``bm25``: the classical baseline, no model output: BM25 over the corpus texts through ``bm25s``
  (English stop-words, English Snowball stemmer, bm25s's defaults ``method="lucene"``, k1=1.5,
  b=0.75; :class:`~trine.retrieval.BM25Index`), top ``top_k``. Not among the default modes.

Matryoshka (``dims``): for each dimension ``d``, mode ``dense@d`` is the dense search with the query
and corpus vectors cut to their first ``d`` values and re-normalised (when the model normalises), from
the one encoding of the corpus; ``dense@<full size>`` is ``dense``.

With a cross-encoder (``reranker``), each mode in ``rerank_modes`` is also reported re-ranked:
its top ``reranker_top_k`` scored by the cross-encoder, as ``rerank(<mode>)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trine.errors import OptionError
from trine.evaluation.data import RetrievalDataset
from trine.evaluation.metrics import DEFAULT_K, DEFAULT_METRICS, evaluate_run
from trine.inference.embedder import M3Embedder
from trine.inference.encoder import Encoder, truncate_dense
from trine.inference.reranker import Reranker
from trine.modeling.fusion import (
    DEFAULT_NORMALIZATION,
    DEFAULT_WEIGHTS,
    FUSED_MODES,
    FusionSettings,
    check_weights,
    read_fusion,
)
from trine.modes import needed_outputs  # the one table of mode needs (tuning imports it from here)
from trine.progress import step
from trine.retrieval import BM25Index, HybridRetriever, QueryReps, SearchResult, weighted_fusion
from trine.retrieval.base import pad_results
from trine.retrieval.hybrid import COLBERT_KINDS
from trine.retrieval.plaid import check_options as check_plaid_options
from trine.scoring import HYBRID_KEYS, MODE_ALIASES, NORMALIZATIONS, canonical_mode

logger = logging.getLogger(__name__)

# FlagEmbedding's score-mode names (trine.scoring.HYBRID_KEYS; the old eval names are aliases), and rrf
MODES = (*HYBRID_KEYS, "rrf", "bm25", "dense+bm25")
DEFAULT_MODES = HYBRID_KEYS
#: the EvalConfig field that gives each fused mode's weights
WEIGHT_FIELDS = {"sparse+dense": "weights_dense_sparse", "colbert+sparse+dense": "weights_all",
                 "dense+bm25": "weights_dense_bm25"}
#: where a fusion setting came from, in the order they are looked up
FUSION_SOURCES = ("given", "model folder", "default")


@dataclass
class EvalConfig:
    modes: Sequence[str] = DEFAULT_MODES
    k_values: Sequence[int] = DEFAULT_K
    metrics: Sequence[str] = DEFAULT_METRICS
    top_k: int = 100
    rerank_k: int = 100
    colbert_search: str = "rerank"
    #: the multi-vector index (trine backend): "exact" (MultiVectorIndex) or "plaid" (ColbertPlaidIndex, compressed,
    #: built with ``colbert_index_options``); with ``colbert_search="full"`` the colbert mode is its own search
    colbert_index: str = "exact"
    colbert_index_options: dict[str, Any] = field(default_factory=dict)
    weights_dense_sparse: Sequence[float] | None = None
    weights_all: Sequence[float] | None = None
    weights_dense_bm25: Sequence[float] | None = None
    normalization: str | None = None
    rrf_k: float = 60.0
    dense_index: str = "flat"
    ignore_identical_ids: bool = False
    batch_size: int | None = None
    query_max_length: int = 64
    passage_max_length: int = 512
    rerank_modes: Sequence[str] = ()
    reranker_top_k: int = 100
    #: query + passage tokens per re-ranked pair; None: 512, or the reranker's positions when it has fewer
    reranker_max_length: int | None = None
    reranker_query_max_length: int | None = None
    dims: Sequence[int] = ()
    #: where the corpus is indexed: "trine" (trine's in-memory indexes), "milvus" or "qdrant" (a collection
    #: at ``backend_uri``, named ``collection``: default ``trine_eval_<hash of the model and corpus ids>``)
    backend: str = "trine"
    backend_uri: str | None = None
    collection: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if MODE_ALIASES.get(m, m) not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown modes {bad}; choose from {MODES} (aliases: {', '.join(MODE_ALIASES)})")
        self.modes = tuple(canonical_mode(m, MODES) for m in self.modes)
        self.rerank_modes = tuple(canonical_mode(m, MODES) for m in self.rerank_modes)
        dims = list(self.dims or ())
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims) \
                or len(set(dims)) != len(dims):
            raise ValueError(f"dims must be distinct positive integers (Matryoshka dimensions), got {dims}")
        self.dims = tuple(int(d) for d in dims)
        if self.colbert_search not in ("rerank", "full"):
            raise ValueError(f"colbert_search must be 'rerank' or 'full', not {self.colbert_search!r}")
        if self.colbert_index not in COLBERT_KINDS:
            raise ValueError(f"colbert_index must be one of {COLBERT_KINDS}, not {self.colbert_index!r}")
        if self.colbert_index_options:
            if self.colbert_index != "plaid":
                raise ValueError(f"colbert_index_options {sorted(self.colbert_index_options)} are the plaid index's; "
                                 f"colbert_index is {self.colbert_index!r}")
            try:
                check_plaid_options(dict(self.colbert_index_options))
            except TypeError as err:
                raise ValueError(str(err)) from None
        if self.colbert_index != "exact" and self.backend != "trine":
            raise ValueError(f"colbert_index {self.colbert_index!r} is trine's; the {self.backend} backend keeps "
                             "its own multi-vectors")
        for mode, name in WEIGHT_FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, tuple(check_weights(mode, list(value), name)))
                except TypeError:
                    raise ValueError(f"{name} must be a list of numbers, got {value!r}") from None
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose from {list(NORMALIZATIONS)}")
        if self.top_k < max(self.k_values):
            raise ValueError(f"top_k ({self.top_k}) must be at least the largest k ({max(self.k_values)})")
        if self.rerank_k < 1:
            raise ValueError(f"rerank_k must be positive, got {self.rerank_k}")
        for name in ("top_k", "query_max_length", "passage_max_length", "reranker_top_k", "reranker_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.backend not in ("trine", "milvus", "qdrant"):
            raise ValueError(f"backend must be 'trine', 'milvus' or 'qdrant', not {self.backend!r}")
        if self.backend != "trine" and self.dense_index not in ("flat", "hnsw"):
            raise ValueError(f"dense_index {self.dense_index!r}: the {self.backend} backend has 'flat' and 'hnsw'")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (or None for the model's), got {self.batch_size}")
        outside = [m for m in self.rerank_modes if m not in self.modes]
        if outside:
            raise ValueError(f"rerank_modes {outside} are not among the evaluated modes {list(self.modes)}")
        if self.rerank_modes and self.reranker_top_k < max(self.k_values):
            raise ValueError(f"reranker_top_k ({self.reranker_top_k}) must be at least the largest k "
                             f"({max(self.k_values)})")


def config_outputs(config: EvalConfig) -> set[str]:
    return needed_outputs(config.modes, config.dims)


def matryoshka_modes(dims: Sequence[int]) -> list[str]:
    """The mode names the Matryoshka ``dims`` are reported under: ``dense@<dim>``."""
    return [f"dense@{d}" for d in dims]


Timed = tuple[SearchResult, float]
Scorer = Callable[[np.ndarray], np.ndarray]


def fused_modes(modes: Sequence[str]) -> list[str]:
    """The weighted-fusion modes among ``modes`` (those with weights: :data:`trine.modeling.fusion.FUSED_MODES`)."""
    return [m for m in modes if m in FUSED_MODES]


def resolve_fusion(config: EvalConfig, model_dir: str | os.PathLike | None = None
                   ) -> tuple[FusionSettings, dict[str, Any]]:
    """The fusion settings for the config's fused modes, each value from the config when given there,
    else from ``model_dir``'s ``fusion.json``, else the defaults; and where each came from:
    ``{"normalization": source, "weights": {mode: source}}`` (sources: :data:`FUSION_SOURCES`)."""
    saved = read_fusion(model_dir) if model_dir is not None else None
    if config.normalization is not None:
        normalization, norm_source = config.normalization, "given"
    elif saved is not None:
        normalization, norm_source = saved.normalization, "model folder"
    else:
        normalization, norm_source = DEFAULT_NORMALIZATION, "default"
    weights: dict[str, list[float]] = {}
    sources: dict[str, str] = {}
    for mode in fused_modes(config.modes):
        given = getattr(config, WEIGHT_FIELDS[mode])
        if given is not None:
            weights[mode], sources[mode] = list(given), "given"
        elif saved is not None and mode in saved.weights:
            weights[mode], sources[mode] = list(saved.weights[mode]), "model folder"
        else:
            weights[mode], sources[mode] = list(DEFAULT_WEIGHTS[mode]), "default"
    tuned_on = saved.tuned_on if saved is not None and "model folder" in (norm_source, *sources.values()) else None
    return (FusionSettings(normalization, weights, tuned_on),
            {"normalization": norm_source, "weights": sources})


def fusion_inputs(mode: str, retriever: HybridRetriever | None, reps: QueryReps,
                  bm25: tuple[BM25Index, Sequence[str]] | None, k: int) -> tuple[list[SearchResult], dict[str, Scorer]]:
    """A fused mode's first-stage lists (top ``k`` each: dense and sparse, or dense and BM25) and the
    exact scorer of each mode it fuses (:data:`trine.modeling.fusion.FUSED_MODES` order)."""
    if retriever is None:
        raise ValueError(f"mode {mode!r} needs the model's index")
    parts = FUSED_MODES[mode]
    scorers: dict[str, Scorer] = {}
    if "bm25" in parts:
        if bm25 is None:
            raise ValueError(f"mode {mode!r} needs the BM25 index and the query texts")
        index, texts = bm25
        candidates = [retriever.first_stage(reps, "dense", k), index.search(texts, k)]
        scorers["dense"] = retriever.scorer(reps, "dense")
        scorers["bm25"] = lambda rows: index.score(texts, rows)
    else:
        candidates = [retriever.first_stage(reps, m, k) for m in ("dense", "sparse")]
        scorers.update((m, retriever.scorer(reps, m)) for m in parts)
    return candidates, scorers


def search_modes(retriever: HybridRetriever | None, reps: QueryReps, config: EvalConfig,
                 bm25: tuple[BM25Index, Sequence[str]] | None = None,
                 fusion: FusionSettings | None = None) -> dict[str, Timed]:
    """Run every configured mode; ``{mode: (result, seconds)}``. ``bm25``: the BM25 index over the
    corpus texts and the query texts (needed for modes ``bm25`` and ``dense+bm25``). ``fusion``: the
    normalization and weights of the fused modes (default: :func:`resolve_fusion` of ``config``)."""
    out: dict[str, Timed] = {}
    k = config.top_k
    fusion = fusion or resolve_fusion(config)[0]
    norm = fusion.normalization
    missing = [m for m in fused_modes(config.modes) if m not in fusion.weights]
    if missing:
        raise ValueError(f"the fusion settings have no weights for {missing}")
    for mode in config.modes:
        step(f"  searching: {mode} (top {k})")
        start = time.perf_counter()
        if mode == "bm25":
            if bm25 is None:
                raise ValueError("mode 'bm25' needs the BM25 index and the query texts")
            res = bm25[0].search(bm25[1], k)
        elif mode == "dense+bm25":
            candidates, scorers = fusion_inputs(mode, retriever, reps, bm25, k)
            res = weighted_fusion(candidates, list(scorers.values()), fusion.weights[mode], k, normalization=norm)
        elif retriever is None:
            raise ValueError(f"mode {mode!r} needs the model's index")
        elif mode != "rrf":
            res = retriever.search_mode(
                reps, mode, k, colbert_search=config.colbert_search, rerank_k=config.rerank_k,
                weights=dict(zip(FUSED_MODES[mode], fusion.weights[mode])) if mode in FUSED_MODES else None,
                normalization=norm)
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


def uses_bm25(modes: Sequence[str]) -> bool:
    return any(m in ("bm25", "dense+bm25") for m in modes)


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


def search_matryoshka(corpus: CorpusIndex, reps: QueryReps, dim: int, normalize: bool, config: EvalConfig
                      ) -> SearchResult:
    """Dense search with queries and corpus cut to ``dim`` dimensions (re-normalised when ``normalize``),
    over an index of the kept corpus vectors built for it; the model's own dense index at full size."""
    full = corpus.dense_vecs.shape[1]
    if dim >= full:
        return corpus.retriever.first_stage(reps, "dense", config.top_k)
    retriever = HybridRetriever.from_encoded({"dense_vecs": truncate_dense(corpus.dense_vecs, dim, normalize)},
                                             corpus.doc_ids, dense_kind=config.dense_index)
    return retriever.first_stage(QueryReps(truncate_dense(reps.dense_vecs, dim, normalize)), "dense", config.top_k)


def encode_queries(model: Encoder, texts: Sequence[str], needs: set[str], config: EvalConfig) -> QueryReps:
    if not needs:
        return QueryReps()
    return QueryReps.from_encode(model.encode_result(list(texts), needs, kind="query", batch_size=config.batch_size,
                                                     max_length=config.query_max_length))


def evaluate_model(model: Encoder, dataset: RetrievalDataset, config: EvalConfig,
                   reranker: Reranker | None = None, *, return_runs: bool = False, corpus: CorpusIndex | None = None,
                   fusion: FusionSettings | None = None) -> dict[str, Any]:
    """Encode corpus and queries once, search every mode (and re-rank the ``rerank_modes`` with the
    cross-encoder), score with pytrec_eval. ``return_runs``: also ``{"runs": {mode: {qid: {doc_id:
    score}}}}``, each mode's ranked lists as scored. ``corpus``: the corpus already encoded by this
    model (:func:`index_corpus`), not encoded again. ``fusion``: the fused modes' settings (default:
    the config's values, else the defaults)."""
    if config.rerank_modes and reranker is None:
        raise ValueError("rerank_modes are set but no reranker is given")
    needs = config_outputs(config)
    if corpus is None:
        corpus = index_corpus(model, dataset, config)
    else:
        corpus.check(dataset, needs, uses_bm25(config.modes))
        if config.dims and corpus.dense_vecs is None:
            raise ValueError("the encoded corpus kept no dense vectors for the Matryoshka dims")
    doc_ids, texts = corpus.doc_ids, corpus.texts
    query_ids = list(dataset.queries)
    query_texts = [dataset.queries[q] for q in query_ids]
    step(f"  encoding {len(query_texts)} queries")
    start = time.perf_counter()
    reps = encode_queries(model, query_texts, needs, config)
    encode_queries_s = time.perf_counter() - start
    bm25 = (corpus.bm25, query_texts) if corpus.bm25 is not None else None
    metrics: dict[str, dict[str, float]] = {}
    search_s: dict[str, float] = {}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    results = search_modes(corpus.retriever, reps, config, bm25, fusion)
    normalize = bool(getattr(getattr(model, "model", None), "normalize_embeddings", True))
    for dim, mode in zip(config.dims, matryoshka_modes(config.dims)):
        start = time.perf_counter()
        results[mode] = (search_matryoshka(corpus, reps, dim, normalize, config), time.perf_counter() - start)
    for mode in config.rerank_modes:
        step(f"  re-ranking the top {config.reranker_top_k} of {mode}")
        start = time.perf_counter()
        reranked = rerank_result(reranker, results[mode][0], query_texts, texts, config)
        results[f"rerank({mode})"] = (reranked, results[mode][1] + time.perf_counter() - start)
    step(f"  scoring {len(results)} modes (pytrec_eval)")
    for mode, (res, seconds) in results.items():
        run = res.to_run(query_ids, doc_ids)
        metrics[mode] = evaluate_run(dataset.qrels, run, config.k_values, config.metrics,
                                     ignore_identical_ids=config.ignore_identical_ids)
        search_s[mode] = seconds
        if return_runs:
            runs[mode] = run
    out: dict[str, Any] = {
        "metrics": metrics,
        "timings": {"encode_corpus_s": corpus.encode_s, "encode_queries_s": encode_queries_s,
                    "index_s": corpus.index_s, "search_s": search_s},
    }
    if return_runs:
        out["runs"] = runs
    return out


def load_embedder(path: str | os.PathLike, config: EvalConfig, options: Mapping[str, Any] | None,
                  corpus: Sequence[str] | None = None) -> M3Embedder:
    """``M3Embedder(path, **options)``; when at most dense scores are needed and no head start is
    asked for, the heads are not loaded (a plain dense model needs none). A ``bm25`` head start
    fits the lexical head on ``corpus`` (the documents searched, as BM25 computes its IDF on them)
    when the folder has no head files."""
    from trine.modeling.families import resolve_family

    # a folder, or a Hub id fetched into the Hugging Face cache; its family the one it records or shows
    family, path = resolve_family(path, "embedder")
    options = dict(options or {})
    if config_outputs(config) <= {"dense"} and options.get("init_missing_heads") is None:
        options.pop("init_missing_heads", None)
        return M3Embedder(family.load(path, with_heads=False), **options)
    if options.get("init_missing_heads") is None or not family.new_heads:
        family.check_outputs(sorted(config_outputs(config)), path)  # e.g. sparse modes of a dense-only model
    if options.get("init_missing_heads") == "bm25" and family.new_heads:
        if corpus is None:
            raise ValueError("init_missing_heads 'bm25' needs the corpus to fit the lexical head on")
        options["head_init_texts"] = list(corpus)
    return M3Embedder(path, **options)


def model_labels(models: Sequence[str | os.PathLike | Encoder]) -> list[str]:
    """Short unique names: the folder name, or as many trailing path parts as it takes to tell it apart; a
    Hub model in the Hugging Face cache is its id (org/name), not its snapshot's commit."""
    from trine.modeling.loading import hub_repo_of

    def path_parts(m: str | os.PathLike) -> list[str]:
        repo = hub_repo_of(m)
        return repo.split("/") if repo else os.path.normpath(os.fspath(m)).strip(os.sep).split(os.sep)

    parts = [None if isinstance(m, Encoder) else path_parts(m) for m in models]
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
    tune_on: RetrievalDataset | None = None,
) -> dict[str, Any]:
    """Evaluate every model; paths are loaded with ``M3Embedder(path, **model_options)``; a
    reranker path with ``Reranker(path, **reranker_options)``. ``return_runs`` keeps each mode's
    ranked lists (``"runs"`` beside ``"metrics"``).

    ``tune_on`` (a dev split of the same data folder, no query in common with ``dataset``): for each
    model (a folder), first tune the fused modes' weights and normalization on it
    (:func:`trine.evaluation.tuning.tune_fusion`) and write them into the folder's ``fusion.json``,
    then evaluate with them; the corpus is encoded once for both.

    Returns ``{"dataset", "split", "queries", "documents", "config", "models": {label: {"path",
    "metrics": {mode: {metric: value}}, "timings", "fusion", "tuning"}}}``: ``"fusion"`` (when a fused
    mode is evaluated) holds the normalization and weights used and their ``"source"`` (``given``,
    ``model folder`` or ``default``); ``"tuning"`` (with ``tune_on``) the tuned settings, their dev
    scores and the file written.
    """
    config = config or EvalConfig()
    if not models:
        raise ValueError("no models to evaluate")
    if tune_on is not None:
        from trine.evaluation.tuning import check_tuning

        check_tuning(models, dataset, tune_on, config)
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
    if reranker is not None and config.reranker_max_length is not None:
        limit = reranker.model.max_positions  # before any encoding: a length the reranker cannot take
        if limit is not None and config.reranker_max_length > limit:
            raise OptionError(f"reranker_max_length: {config.reranker_max_length} is more than the reranker's "
                              f"{limit} positions")
    for model, label in zip(models, model_labels(models)):
        model_dir = None if isinstance(model, Encoder) else os.fspath(model)
        embedder = model if isinstance(model, Encoder) else load_embedder(model, config, model_options,
                                                                          dataset.passages()[1])
        step(f"evaluating {label} on {dataset.name} ({len(dataset.queries)} queries, {len(dataset.corpus)} documents)")
        entry: dict[str, Any] = {"path": model_dir}
        corpus = None
        if tune_on is not None:
            from trine.evaluation.tuning import tune_fusion
            from trine.modeling.fusion import write_fusion

            corpus = index_corpus(embedder, dataset, config)
            step(f"  tuning fusion weights on {tune_on.name} {tune_on.split} ({len(tune_on.queries)} queries)")
            settings = tune_fusion(embedder, tune_on, config, corpus=corpus)
            entry["tuning"] = {**settings.to_dict(), "file": write_fusion(model_dir, settings)}
        fusion, sources = resolve_fusion(config, model_dir)
        if fusion.weights:
            entry["fusion"] = {**fusion.to_dict(), "source": sources}
        entry.update(evaluate_model(embedder, dataset, config, reranker, return_runs=return_runs, corpus=corpus,
                                    fusion=fusion))
        result["models"][label] = entry
    return result


def main_metric_table(result: Mapping[str, Any], metrics: Sequence[str]) -> list[list[str]]:
    """Rows ``[model, mode, metric values...]`` as strings (4 decimals)."""
    rows = []
    for label, entry in result["models"].items():
        for mode, values in entry["metrics"].items():
            rows.append([label, mode] + [f"{values[m]:.4f}" if m in values else "" for m in metrics])
    return rows
