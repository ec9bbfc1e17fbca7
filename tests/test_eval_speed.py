"""Evaluation that scores every candidate once: the cached path gives the numbers of the re-scoring path.

References: pairwise maxsim (:func:`trine.scoring.colbert_score`) for the vectorised multi-vector scores; the
retriever's own search path (first stages, exact scorers, weighted fusion per mode) for the evaluation; a grid
search that re-scores and re-ranks every weighting and measures it with pytrec_eval for the tuning.
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_fusion import OPTIONS, pages  # the shared man-page-like data

from trine.evaluation import EvalConfig, build_manpages_beir, evaluate_model, evaluate_run, index_corpus, load_dataset
from trine.evaluation.candidates import ScoredCandidates, encode_queries
from trine.evaluation.config import config_outputs
from trine.evaluation.tuning import _fused_grid, _grid, tune_fusion
from trine.modeling.fusion import FUSED_MODES
from trine.retrieval import MultiVectorIndex, weighted_fusion
from trine.scoring import colbert_score, fuse_scores, normalize_scores

MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense", "rrf", "bm25", "dense+bm25")



@pytest.fixture(scope="module")
def setup(tmp_path_factory, splade_tiny_dir):
    from trine import M3Embedder

    tmp = tmp_path_factory.mktemp("evalspeed")
    data = build_manpages_beir(tmp / "data", pages=pages(48), seed=0, dev_fraction=0.25)
    model = M3Embedder(shutil.copytree(splade_tiny_dir, tmp / "model"), **OPTIONS)
    return model, load_dataset(data, "test"), load_dataset(data, "dev")


# ---------------------------------------------------------------------- vectorised maxsim
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_multivector_score_equals_pairwise_maxsim(dtype):
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(n, 8)).astype(np.float32) for n in (5, 1, 17, 0, 9, 3, 30, 2)]
    index = MultiVectorIndex.build(docs, dtype=dtype)
    stored = [index.doc_vectors(r).astype(np.float32) for r in range(len(docs))]
    queries = [rng.normal(size=(n, 8)).astype(np.float32) for n in (4, 7, 1)]
    rows = np.array([[0, 2, 3, -1, 6], [7, 6, 5, 4, 1], [-1, -1, -1, -1, -1]])
    got = index.score(queries, rows)
    for i, q in enumerate(queries):
        for j, r in enumerate(rows[i]):
            want = -np.inf if r < 0 else colbert_score(q, stored[r])
            assert got[i, j] == pytest.approx(want, abs=1e-5), (i, j)
    full = index.search(queries, 8)
    for i, q in enumerate(queries):
        want = sorted(range(len(docs)), key=lambda r: (-colbert_score(q, stored[r]), r))
        assert full.rows[i].tolist() == want
    with pytest.raises(ValueError, match="below the index's 8 documents"):
        index.score(queries, np.array([[8], [0], [0]]))


# ---------------------------------------------------------------------- the candidates' scores, looked up
def test_scored_candidates_look_up_what_the_indexes_score(setup):
    model, test, _ = setup
    config = EvalConfig(modes=MODES, k_values=(1, 10), metrics=("ndcg",), top_k=12, rerank_k=8)
    corpus = index_corpus(model, test, config)
    texts = list(test.queries.values())
    reps = encode_queries(model, texts, config_outputs(config), config)
    scored = ScoredCandidates.build(corpus, reps, texts, config.modes, config)
    assert set(scored.lists) == {("dense", 12), ("dense", 8), ("sparse", 12), ("bm25", 12)}
    assert set(scored.scores) == {"dense", "sparse", "colbert", "bm25"}
    sub = scored.first_stage("sparse", 12).rows  # a subset of what dense and sparse scored, in another order
    sub = np.where(np.arange(sub.shape[1]) % 3 == 1, -1, sub[:, ::-1])
    for part in ("dense", "sparse", "colbert"):
        want = corpus.retriever.scorer(reps, part)(sub)
        np.testing.assert_allclose(scored.scorer(part)(sub), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(scored.scorer("bm25")(scored.first_stage("bm25", 12).rows),
                                  corpus.bm25.score(texts, scored.first_stage("bm25", 12).rows))
    outside = np.setdiff1d(np.arange(len(corpus.doc_ids)), scored.rows["bm25"][0])[:1]
    bad = np.full((len(texts), 1), -1)
    bad[0, 0] = outside[0]
    with pytest.raises(ValueError, match="rows outside the candidates 'bm25' scored"):
        scored.scorer("bm25")(bad)
    with pytest.raises(ValueError, match="no first-stage list sparse top 5"):
        scored.first_stage("sparse", 5)


# ---------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("normalization", ["none", "minmax", "zscore"])
def test_fast_evaluation_equals_the_retrievers_path(setup, normalization):
    """Every mode's metrics (pytrec_eval) as the retriever's own search gives them, re-scoring per mode."""
    model, test, _ = setup
    assert_fast_equals_the_retrievers_path(model, test, normalization)


def test_fast_evaluation_breaks_ties_between_duplicate_documents_as_the_retriever(tmp_path, setup):
    """Pages with the same text score the same under every head: the order between them (and so the metrics)
    is the retriever's, which a change of how candidates are chunked or merged would flip."""
    from trine.datasets.manpages import ManPage

    model, _, _ = setup
    base = pages(24)
    twins = [ManPage(f"twin{i}.1", p.name, p.description) for i, p in enumerate(base[:12])]
    data = build_manpages_beir(tmp_path / "dup", pages=base + twins, seed=1, dev_fraction=0.0)
    test = load_dataset(data, "test")
    texts = [doc["text"] for doc in test.corpus.values()]
    assert len(set(texts)) < len(texts), "the data set must hold duplicate documents"
    for normalization in ("none", "minmax"):
        assert_fast_equals_the_retrievers_path(model, test, normalization)


def assert_fast_equals_the_retrievers_path(model, test, normalization: str) -> None:
    config = EvalConfig(modes=MODES, k_values=(1, 5, 10), metrics=("ndcg", "recall", "mrr"), top_k=12, rerank_k=10,
                        normalization=normalization, weights_dense_sparse=(1.0, 0.7), weights_all=(1.0, 0.5, 2.0),
                        weights_dense_bm25=(1.0, 0.2))
    corpus = index_corpus(model, test, config)
    fast = evaluate_model(model, test, config, corpus=corpus, return_runs=True)
    query_ids = list(test.queries)
    texts = [test.queries[q] for q in query_ids]
    reps = encode_queries(model, texts, config_outputs(config), config)
    retriever, k = corpus.retriever, config.top_k
    weights = {"sparse+dense": config.weights_dense_sparse, "colbert+sparse+dense": config.weights_all}
    reference = {m: retriever.search_mode(reps, m, k, rerank_k=config.rerank_k, normalization=normalization,
                                          weights=dict(zip(FUSED_MODES[m], weights[m])) if m in weights else None)
                 for m in ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")}
    reference["rrf"] = retriever.search(reps, k, {"dense": 1.0, "sparse": 1.0, "colbert": 1.0}, candidate_k=k,
                                        fusion="rrf", rrf_k=config.rrf_k)
    reference["bm25"] = corpus.bm25.search(texts, k)
    reference["dense+bm25"] = weighted_fusion(
        [retriever.first_stage(reps, "dense", k), corpus.bm25.search(texts, k)],
        [retriever.scorer(reps, "dense"), lambda rows: corpus.bm25.score(texts, rows)], config.weights_dense_bm25, k,
        normalization=normalization)
    assert set(fast["metrics"]) == set(MODES)
    for mode, res in reference.items():
        run = res.to_run(query_ids, corpus.doc_ids)
        want = evaluate_run(test.qrels, run, config.k_values, config.metrics)
        assert fast["metrics"][mode] == pytest.approx(want, abs=1e-12), mode
        for qid in query_ids:
            assert list(fast["runs"][mode][qid]) == list(run[qid]), (mode, qid)
            np.testing.assert_allclose(list(fast["runs"][mode][qid].values()), list(run[qid].values()), rtol=1e-6)
    timings = fast["timings"]
    assert set(timings["candidates_s"]) == {"dense@12", "dense@10", "sparse@12", "bm25@12", "score dense",
                                            "score sparse", "score colbert", "score bm25"}


# ---------------------------------------------------------------------- tuning
def test_fused_grid_is_fuse_scores_for_every_weighting():
    rng = np.random.default_rng(2)
    valid = rng.random((5, 9)) > 0.2
    parts = [normalize_scores(np.where(valid, rng.normal(size=(5, 9)), -np.inf), valid, "zscore") for _ in range(3)]
    combos = _grid(3, (0.0, 0.3, 1.0, 3.0))
    got = _fused_grid(parts, np.asarray(combos), valid)
    for w, fused in zip(combos, got):
        np.testing.assert_array_equal(fused, fuse_scores(parts, w, valid))  # the same float operations


def test_tuning_over_cached_scores_equals_tuning_by_rescoring(setup, monkeypatch):
    """The chosen normalization, weights and dev nDCG@10 are those of a grid search that re-scores every
    candidate, re-fuses and measures every weighting with pytrec_eval; each head scores the dev candidates once."""
    model, _, dev = setup
    grid = (0.0, 0.3, 1.0, 3.0)
    config = EvalConfig(modes=("sparse+dense", "colbert+sparse+dense", "dense+bm25"), k_values=(10,),
                        metrics=("ndcg",), top_k=12)
    corpus = index_corpus(model, dev, config)
    calls = []
    for index in (*corpus.retriever.indexes.values(), corpus.bm25):
        original = index.score
        monkeypatch.setattr(index, "score", lambda q, rows, _o=original, _i=index: calls.append(_i) or _o(q, rows))
    settings = tune_fusion(model, dev, config, corpus=corpus, grid=grid, calibrate=False)  # the grid alone
    assert len(calls) == 4 and len(set(map(id, calls))) == 4  # dense, sparse, colbert, bm25: once each
    monkeypatch.undo()

    query_ids = list(dev.queries)
    texts = [dev.queries[q] for q in query_ids]
    reps = encode_queries(model, texts, config_outputs(config), config)
    retriever, k = corpus.retriever, config.top_k

    def inputs(mode):
        if mode == "dense+bm25":
            return ([retriever.first_stage(reps, "dense", k), corpus.bm25.search(texts, k)],
                    [retriever.scorer(reps, "dense"), lambda rows: corpus.bm25.score(texts, rows)])
        return ([retriever.first_stage(reps, m, k) for m in ("dense", "sparse")],
                [retriever.scorer(reps, p) for p in FUSED_MODES[mode]])

    best = {}
    for norm in ("minmax", "zscore"):
        best[norm] = {}
        for mode in config.modes:
            top = None
            for weights in _grid(len(FUSED_MODES[mode]), grid):
                lists, scorers = inputs(mode)  # re-searched and re-scored for every weighting
                run = weighted_fusion(lists, scorers, weights, k, normalization=norm).to_run(query_ids, corpus.doc_ids)
                value = evaluate_run(dev.qrels, run, [10], ["ndcg"])["ndcg@10"]
                if top is None or value > top[0] + 1e-12:
                    top = (value, weights)
            best[norm][mode] = top
    mean = {n: np.mean([best[n][m][0] for m in config.modes]) for n in best}
    chosen = "zscore" if mean["zscore"] > mean["minmax"] + 1e-12 else "minmax"
    assert settings.normalization == chosen
    for mode in config.modes:
        assert settings.weights[mode] == list(best[chosen][mode][1]), mode
        assert settings.tuned_on["dev"][mode] == pytest.approx(best[chosen][mode][0], abs=1e-12), mode


def test_tuning_and_runner_do_not_import_each_other():
    """trine.evaluation.tuning imports nothing of trine.evaluation.runner (not even inside a function)."""
    import trine.evaluation.tuning as tuning

    tree = ast.parse(Path(tuning.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("trine.evaluation.runner")}



# ---------------------------------------------------------------------- fusion analysis
def test_fusion_analysis_equals_a_hand_computation(setup):
    from trine.evaluation.analysis import analysis_table, analyze_fusion
    from trine.modeling.fusion import FusionSettings

    model, test, _ = setup
    grid = (0.0, 0.5, 2.0)
    config = EvalConfig(modes=("dense", "sparse", "colbert", "colbert+sparse+dense", "bm25"), k_values=(1, 10),
                        metrics=("ndcg", "mrr"), top_k=12)
    fusion = FusionSettings("minmax", {"colbert+sparse+dense": [1.0, 0.5, 2.0]})
    out = analyze_fusion(model, test, config, fusion=fusion, threshold=0.6, grid=grid)
    qids = list(test.qrels)
    per = {}
    for weights in [None, *_grid(3, grid)]:  # the heads, and the fused mode at every weighting of the grid
        given = EvalConfig(**{**dataclasses.asdict(config), "normalization": "minmax",
                              "weights_all": weights or (1.0, 0.5, 2.0)})
        runs = evaluate_model(model, test, given, return_runs=True)["runs"]
        for mode in (config.modes if weights is None else ("colbert+sparse+dense",)):
            _, values = evaluate_run(test.qrels, runs[mode], [1, 10], ["ndcg", "mrr"], per_query=True)
            per[mode if weights is None else weights] = values
    ndcg = {m: np.array([per[m][q]["ndcg@10"] for q in qids]) for m in per}
    hit = {m: np.array([per[m][q]["mrr@1"] > 0 for q in qids]) for m in config.modes}
    for mode in config.modes:
        assert out["ndcg@10"][mode] == pytest.approx(ndcg[mode].mean(), abs=1e-12)
        assert out["right"][mode] == pytest.approx({"ndcg@10>=0.6": (ndcg[mode] >= 0.6).mean(),
                                                    "hit@1": hit[mode].mean()})
    heads = ("dense", "sparse", "colbert")
    assert out["oracle ndcg@10"]["best single head"] == pytest.approx(np.max([ndcg[h] for h in heads], 0).mean())
    assert out["oracle ndcg@10"]["best single head or bm25"] == pytest.approx(
        np.max([ndcg[h] for h in (*heads, "bm25")], 0).mean())
    best = np.max([ndcg[w] for w in _grid(3, grid)], 0).mean()
    assert out["oracle ndcg@10"]["best weights per query: colbert+sparse+dense"] == pytest.approx(best, abs=1e-9)
    only_dense = (hit["dense"] & ~hit["sparse"] & ~hit["colbert"]).mean()
    assert out["hit@1 by the heads that get it"]["dense"] == pytest.approx(only_dense)
    assert sum(out["hit@1 by the heads that get it"].values()) == pytest.approx(1.0)
    fused, any_head = hit["colbert+sparse+dense"], hit["dense"] | hit["sparse"] | hit["colbert"]
    assert out["fusion vs heads (hit@1)"]["colbert+sparse+dense"] == pytest.approx(
        {"fused only": (fused & ~any_head).mean(), "a head only": (~fused & any_head).mean()})
    assert "| oracle | nDCG@10 |" in analysis_table(out)
    with pytest.raises(ValueError, match=r"add \['colbert'\] to the modes"):
        analyze_fusion(model, test, EvalConfig(modes=("dense", "sparse"), k_values=(10,), top_k=12))
