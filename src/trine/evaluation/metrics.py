"""Retrieval metrics through pytrec_eval: nDCG@k, Recall@k, MRR@k, MAP@k, P@k.

Averages are over every judged query; a query the run does not answer counts 0 (pytrec_eval
alone would leave it out of the mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytrec_eval

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
METRICS = ("ndcg", "recall", "mrr", "map", "precision")
DEFAULT_METRICS = ("ndcg", "recall", "mrr", "map")
DEFAULT_K = (1, 3, 5, 10, 100)
_MEASURE = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "precision": "P"}


def truncate_run(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` in trec_eval's order: score descending, ties by document id descending."""
    out = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]
        out[qid] = dict(ranked)
    return out


def evaluate_run(
    qrels: Qrels,
    run: Run,
    k_values: Sequence[int] = DEFAULT_K,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    ignore_identical_ids: bool = False,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``{"ndcg@10": ..., "recall@100": ..., "mrr@10": ...}`` averaged over the judged queries.

    ``ignore_identical_ids`` drops a document whose id equals its query's (BEIR's option; keep it
    False unless queries are documents of the corpus). ``per_query=True`` also returns the
    per-query values.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {list(k_values)}")
    if not qrels:
        raise ValueError("qrels are empty")
    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    clean = {}
    for qid, docs in run.items():
        if qid not in judged:
            continue
        clean[qid] = {d: float(s) for d, s in docs.items() if not (ignore_identical_ids and d == qid)}
    values: dict[str, dict[str, float]] = {q: {} for q in judged}
    measures = {f"{_MEASURE[m]}.{','.join(map(str, ks))}" for m in metrics if m in _MEASURE}
    if measures and clean:
        res = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(clean)
        for qid, scores in res.items():
            for m in metrics:
                if m in _MEASURE:
                    for k in ks:
                        values[qid][f"{m}@{k}"] = scores[f"{_MEASURE[m]}_{k}"]
    if "mrr" in metrics and clean:
        for k in ks:
            res = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(truncate_run(clean, k))
            for qid, scores in res.items():
                values[qid][f"mrr@{k}"] = scores["recip_rank"]
    names = [f"{m}@{k}" for m in metrics for k in ks]
    mean = {n: float(np.mean([values[q].get(n, 0.0) for q in judged])) for n in names}
    if per_query:
        return mean, {q: {n: values[q].get(n, 0.0) for n in names} for q in judged}
    return mean
