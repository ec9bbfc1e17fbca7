"""Why fusion adds little: per-query agreement of the heads, and the oracle fusions, from the cached scores.

:func:`analyze_fusion` evaluates one model's modes once (:class:`~trine.evaluation.candidates.ScoredCandidates`:
every candidate scored once per head) and measures, per query (pytrec_eval's per-query nDCG@10 and hit@1):

- the share of queries each head (and BM25, and each fused mode) alone gets right: nDCG@10 at least
  ``threshold``, and a relevant document ranked first (hit@1);
- where the heads agree: the share of queries answered (hit@1) by each subset of the model's heads
  exactly (``"none"``, ``"dense"``, ..., ``"colbert+dense+sparse"``);
- what fusion wins and loses: queries a fused mode answers that no head does, and queries some head
  answers that the fused mode misses;
- oracle fusions, upper bounds no real fusion reaches: the per-query best single head, and the per-query
  best weighting of each fused mode over the tuning grid (with the model's normalization).

If the oracles are far above the tuned fusion, the heads disagree usefully and a fusion that can tell which
head to trust per query (calibration, per-query weights) could gain; if they are close, the heads fail on the
same queries and no weighting helps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from trine.evaluation.candidates import FIRST_STAGES, CorpusIndex, ScoredCandidates, encode_queries, index_corpus
from trine.evaluation.config import EvalConfig, config_outputs
from trine.evaluation.data import RetrievalDataset
from trine.evaluation.metrics import evaluate_run
from trine.evaluation.runner import resolve_fusion, search_modes
from trine.evaluation.tuning import TUNE_GRID, _FastNdcg, _fused_grid, _grid
from trine.inference.encoder import Encoder
from trine.modeling.fusion import FUSED_MODES, FusionSettings
from trine.retrieval import union_rows
from trine.scoring import normalize_scores

#: the model's own heads (BM25 is reported beside them, not counted as a head)
HEADS = ("dense", "sparse", "colbert")


def analyze_fusion(model: Encoder, dataset: RetrievalDataset, config: EvalConfig, *,
                   fusion: FusionSettings | None = None, corpus: CorpusIndex | None = None,
                   threshold: float = 0.5, grid: Sequence[float] = TUNE_GRID) -> dict[str, Any]:
    """The per-query analysis of the module doc for ``config.modes`` (they must include the three heads);
    ``fusion``: the fused modes' settings (default: the config's, else the defaults; pass
    :func:`~trine.evaluation.runner.resolve_fusion` of the model folder for its tuned ones)."""
    missing = [h for h in HEADS if h not in config.modes]
    if missing:
        raise ValueError(f"the fusion analysis compares the heads: add {missing} to the modes")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    fusion = fusion or resolve_fusion(config)[0]
    corpus = corpus or index_corpus(model, dataset, config)
    query_ids = list(dataset.queries)
    texts = [dataset.queries[q] for q in query_ids]
    reps = encode_queries(model, texts, config_outputs(config), config)
    scored = ScoredCandidates.build(corpus, reps, texts, config.modes, config)
    results = search_modes(scored, config, fusion, retriever=corpus.retriever, reps=reps)
    judged = list(dataset.qrels)
    per_query = {}
    for mode, (res, _) in results.items():
        _, values = evaluate_run(dataset.qrels, res.to_run(query_ids, corpus.doc_ids), [1, 10], ["ndcg", "mrr"],
                                 per_query=True)
        per_query[mode] = values
    ndcg = {m: np.array([per_query[m][q]["ndcg@10"] for q in judged]) for m in per_query}
    hit = {m: np.array([per_query[m][q]["mrr@1"] > 0 for q in judged]) for m in per_query}
    out: dict[str, Any] = {
        "dataset": dataset.name, "split": dataset.split, "queries": len(judged), "threshold": threshold,
        "normalization": fusion.normalization, "weights": fusion.weights,
        "ndcg@10": {m: float(v.mean()) for m, v in ndcg.items()},
        "right": {m: {f"ndcg@10>={threshold:g}": float((ndcg[m] >= threshold).mean()), "hit@1": float(hit[m].mean())}
                  for m in ndcg},
    }
    heads = np.stack([hit[h] for h in HEADS])
    agreement = {}
    for size in range(len(HEADS) + 1):
        for subset in itertools.combinations(range(len(HEADS)), size):
            exact = np.all([heads[i] if i in subset else ~heads[i] for i in range(len(HEADS))], axis=0)
            agreement["+".join(sorted(HEADS[i] for i in subset)) or "none"] = float(exact.mean())
    out["hit@1 by the heads that get it"] = agreement
    any_head = heads.any(0)
    out["fusion vs heads (hit@1)"] = {
        m: {"fused only": float((hit[m] & ~any_head).mean()), "a head only": float((~hit[m] & any_head).mean())}
        for m in results if m in FUSED_MODES}
    oracle = {"best single head": float(np.max([ndcg[h] for h in HEADS], 0).mean())}
    if "bm25" in ndcg:
        oracle["best single head or bm25"] = float(np.max([ndcg[h] for h in (*HEADS, "bm25")], 0).mean())
    for mode in (m for m in config.modes if m in FUSED_MODES):
        rows = union_rows([scored.first_stage(x, config.top_k) for x in FIRST_STAGES[mode]])
        valid = rows >= 0
        parts = [normalize_scores(np.asarray(scored.scorer(p)(rows), dtype=np.float64), valid, fusion.normalization)
                 for p in FUSED_MODES[mode]]
        fast = _FastNdcg(rows, dataset, query_ids, corpus.doc_ids, config.top_k, config.ignore_identical_ids)
        combos = np.asarray(_grid(len(parts), grid), dtype=np.float64)
        best = np.max(np.concatenate([fast.per_query(_fused_grid(parts, combos[i : i + 32], valid))
                                      for i in range(0, len(combos), 32)]), 0)
        oracle[f"best weights per query: {mode}"] = float(best.sum() / fast.total_queries)
    out["oracle ndcg@10"] = oracle
    return out


def analysis_table(analysis: dict[str, Any]) -> str:
    """The analysis as markdown: each mode's nDCG@10 and shares right, the agreement, the oracles."""
    t = analysis["threshold"]
    lines = [f"{analysis['dataset']} ({analysis['split']}): {analysis['queries']} queries, normalization "
             f"{analysis['normalization']}", "", f"| mode | nDCG@10 | share nDCG@10 >= {t:g} | share hit@1 |",
             "|---|---|---|---|"]
    for mode, value in analysis["ndcg@10"].items():
        right = analysis["right"][mode]
        lines.append(f"| {mode} | {value:.4f} | {right[f'ndcg@10>={t:g}']:.3f} | {right['hit@1']:.3f} |")
    lines += ["", "| heads with a hit@1 (exactly) | share of queries |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in analysis["hit@1 by the heads that get it"].items()]
    lines += ["", "| fused mode | hit@1 no head has | hit@1 a head has, fusion lost |", "|---|---|---|"]
    lines += [f"| {m} | {v['fused only']:.3f} | {v['a head only']:.3f} |"
              for m, v in analysis["fusion vs heads (hit@1)"].items()]
    lines += ["", "| oracle | nDCG@10 |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in analysis["oracle ndcg@10"].items()]
    return "\n".join(lines)
