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
from dataclasses import asdict
from typing import Any

import numpy as np

from trine.errors import OptionError
from trine.evaluation.candidates import (  # noqa: F401  (CorpusIndex, index_corpus: re-exported)
    CorpusIndex,
    ScoredCandidates,
    encode_queries,
    index_corpus,
)
from trine.evaluation.config import (  # noqa: F401  (the mode vocabulary: re-exported)
    DEFAULT_MODES,
    FUSION_SOURCES,
    MODES,
    WEIGHT_FIELDS,
    EvalConfig,
    config_outputs,
    fused_modes,
    matryoshka_modes,
    needed_outputs,
    uses_bm25,
)
from trine.evaluation.data import RetrievalDataset
from trine.evaluation.metrics import evaluate_run
from trine.evaluation.tuning import check_tuning, tune_fusion
from trine.inference.embedder import M3Embedder
from trine.inference.encoder import Encoder, truncate_dense
from trine.inference.reranker import Reranker
from trine.modeling.fusion import DEFAULT_NORMALIZATION, DEFAULT_WEIGHTS, FusionSettings, read_fusion, write_fusion
from trine.progress import step
from trine.retrieval import HybridRetriever, QueryReps, SearchResult
from trine.retrieval.base import pad_results

logger = logging.getLogger(__name__)

Timed = tuple[SearchResult, float]
Scorer = Callable[[np.ndarray], np.ndarray]


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
    # calibrated fusion's coefficients were fitted with the folder's weights and normalization: they
    # apply only where both come from it (weights or a normalization given here fuse plainly)
    confidence = {m: c for m, c in saved.confidence.items() if m in weights and sources[m] == "model folder"
                  and norm_source == "model folder"} if saved is not None else {}
    return (FusionSettings(normalization, weights, tuned_on, confidence),
            {"normalization": norm_source, "weights": sources})


def search_modes(candidates: ScoredCandidates, config: EvalConfig, fusion: FusionSettings | None = None, *,
                 retriever: HybridRetriever | None = None, reps: QueryReps | None = None) -> dict[str, Timed]:
    """Rank every configured mode from one query set's scored candidates; ``{mode: (result, seconds)}``
    (the seconds of the ranking itself: the first stages and scoring are ``candidates.seconds``).
    ``fusion``: the normalization and weights of the fused modes (default: :func:`resolve_fusion` of
    ``config``). ``retriever`` and ``reps``: the model's index and the queries, for ``colbert_search="full"``
    (an exact search of the whole corpus, no candidates)."""
    out: dict[str, Timed] = {}
    k = config.top_k
    fusion = fusion or resolve_fusion(config)[0]
    missing = [m for m in fused_modes(config.modes) if m not in fusion.weights]
    if missing:
        raise ValueError(f"the fusion settings have no weights for {missing}")
    for mode in config.modes:
        step(f"  searching: {mode} (top {k})")
        start = time.perf_counter()
        if mode in ("dense", "sparse", "bm25"):
            res = candidates.first_stage(mode, k)
        elif mode == "colbert" and config.colbert_search == "full":
            if retriever is None or reps is None:
                raise ValueError("colbert_search 'full' needs the model's index and the encoded queries")
            res = retriever.first_stage(reps, "colbert", k)
        elif mode == "colbert":
            res = candidates.rerank("colbert", candidates.first_stage("dense", config.rerank_k),
                                    min(k, config.rerank_k))
        elif mode == "rrf":
            res = candidates.rrf(k, config.rrf_k)
        else:
            res = candidates.fuse(mode, fusion.weights[mode], k, fusion.normalization, fusion.coefficients(mode))
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
    metrics: dict[str, dict[str, float]] = {}
    search_s: dict[str, float] = {}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    step(f"  first stages and each head's scores of the candidates ({len(query_texts)} queries)")
    candidates = ScoredCandidates.build(corpus, reps, query_texts, config.modes, config)
    results = search_modes(candidates, config, fusion, retriever=corpus.retriever, reps=reps)
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
    start = time.perf_counter()
    for mode, (res, seconds) in results.items():
        run = res.to_run(query_ids, doc_ids)
        metrics[mode] = evaluate_run(dataset.qrels, run, config.k_values, config.metrics,
                                     ignore_identical_ids=config.ignore_identical_ids)
        search_s[mode] = seconds
        if return_runs:
            runs[mode] = run
    metrics_s = time.perf_counter() - start
    out: dict[str, Any] = {
        "metrics": metrics,
        "timings": {"encode_corpus_s": corpus.encode_s, "encode_queries_s": encode_queries_s,
                    "index_s": corpus.index_s, "candidates_s": dict(candidates.seconds), "search_s": search_s,
                    "metrics_s": metrics_s},
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
