"""Calibrated fusion: per-head confidence coefficients on the normalised scores, fitted on a dev split, kept in
fusion.json and applied by every reader of it (evaluation, the retriever's search behind /search)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from test_fusion import OPTIONS, pages  # the shared man-page-like data

from trine.errors import InputError
from trine.evaluation import EvalConfig, build_manpages_beir, load_dataset, run_evaluation
from trine.evaluation.candidates import FIRST_STAGES, ScoredCandidates, encode_queries, index_corpus
from trine.evaluation.config import config_outputs
from trine.evaluation.runner import resolve_fusion
from trine.evaluation.tuning import CALIBRATION_MIN_GAIN, fit_confidence
from trine.modeling.fusion import FUSION_FILE, FusionSettings, read_fusion, write_fusion
from trine.retrieval import (
    DenseIndex,
    HybridRetriever,
    QueryReps,
    SearchResult,
    SparseIndex,
    union_rows,
    weighted_fusion,
)
from trine.scoring import fuse_scores, head_confidence

NEG = -np.inf


def hand_normalize(values: list[float], method: str) -> list[float]:
    if method == "none":
        return list(values)
    lo, hi = min(values), max(values)
    if method == "minmax":
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


def hand_calibrated(tables: list[list[list[float]]], weights: list[float], confidence: list[float],
                    valid: list[list[bool]], method: str) -> list[list[float]]:
    """Per query (row): each head normalised over the valid cells, weight w * exp(c * (first - second)), summed."""
    out = []
    for q, mask in enumerate(valid):
        cells = [j for j, ok in enumerate(mask) if ok]
        total = [0.0] * len(mask)
        for table, w, c in zip(tables, weights, confidence):
            normed = hand_normalize([table[q][j] for j in cells], method)
            ordered = sorted(normed, reverse=True)
            gap = ordered[0] - ordered[1] if len(ordered) >= 2 else 0.0
            for j, v in zip(cells, normed):
                total[j] += w * math.exp(c * gap) * v
        out.append(total)
    return out


def test_head_confidence_by_hand():
    normed = np.array([[0.2, 0.9, 0.5, 0.0], [3.0, 3.0, 1.0, 0.0], [0.7, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    valid = np.array([[True, True, True, False], [True, True, True, True], [True, False, False, False],
                      [False] * 4])
    # 0.9 - 0.5; a tie at the top is no confidence; one valid cell (the 5.0 is padding) or none: 0
    np.testing.assert_allclose(head_confidence(normed, valid), [0.4, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        head_confidence(normed, valid[:2])


@pytest.mark.parametrize("method", ["minmax", "zscore", "none"])
def test_calibrated_fusion_equals_a_hand_computation(method):
    dense = [[0.9, 0.2, 0.4, 0.1], [0.3, 0.8, 0.75, 0.0], [0.5, 0.1, 0.0, 0.0]]
    sparse = [[1.0, 7.0, 0.0, 2.0], [4.0, 0.0, 1.0, 9.0], [0.0, 3.0, 0.0, 0.0]]
    colbert = [[0.6, 0.61, 0.2, 0.3], [0.5, 0.9, 0.1, 0.4], [0.8, 0.2, 0.0, 0.0]]
    valid = [[True, True, True, True], [True, True, True, False], [True, True, False, False]]
    weights, confidence = [1.0, 0.3, 1.5], [0.7, -1.2, 2.0]
    mask = np.array(valid)
    tables = [dense, sparse, colbert]
    got = fuse_scores([np.where(mask, t, NEG) for t in map(np.array, tables)], weights, mask, method, confidence)
    want = hand_calibrated(tables, weights, confidence, valid, method)
    np.testing.assert_allclose(got, np.where(mask, want, 0.0), rtol=1e-12, atol=1e-12)
    # coefficients 0 (or none) are plain weighted fusion, to the last bit
    plain = fuse_scores([np.array(t) for t in tables], weights, mask, method)
    np.testing.assert_array_equal(fuse_scores([np.array(t) for t in tables], weights, mask, method, [0.0] * 3), plain)
    np.testing.assert_allclose(plain, np.where(mask, hand_calibrated(tables, weights, [0.0] * 3, valid, method), 0.0),
                               rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, plain)
    with pytest.raises(ValueError, match="2 confidence coefficients for 3 score matrices"):
        fuse_scores([np.array(t) for t in tables], weights, mask, method, [1.0, 1.0])


def test_retriever_search_with_confidence_equals_hand_fusion():
    """The path /search takes (HybridRetriever.search_mode) ranks by the calibrated score of the union of candidates."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(12, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    lex = [{str(t): float(rng.uniform(0.1, 2)) for t in rng.choice(20, size=4, replace=False)} for _ in range(12)]
    q_vecs = vecs[:3] + 0.3 * rng.normal(size=(3, 8)).astype(np.float32)
    q_lex = [dict(list(x.items())[:2]) for x in lex[5:8]]
    retriever = HybridRetriever(DenseIndex.build(vecs), SparseIndex.build(lex))
    reps = QueryReps(q_vecs, q_lex)
    dense = q_vecs.astype(np.float64) @ vecs.T.astype(np.float64)
    sparse = np.array([[sum(w * d.get(t, 0.0) for t, w in q.items()) for d in lex] for q in q_lex])
    k = 5  # search_mode fuses the dense and sparse top k
    first = [retriever.first_stage(reps, m, k) for m in ("dense", "sparse")]
    got = retriever.search_mode(reps, "sparse+dense", k, weights={"dense": 1.0, "sparse": 0.7}, normalization="zscore",
                                confidence={"dense": 1.5, "sparse": -0.5})
    for q in range(3):
        union = sorted({r for res in first for r in res.rows[q].tolist() if r >= 0})
        (scores,) = hand_calibrated([[[dense[q][r] for r in union]], [[sparse[q][r] for r in union]]], [1.0, 0.7],
                                    [1.5, -0.5], [[True] * len(union)], "zscore")
        order = sorted(range(len(union)), key=lambda j: -scores[j])[:5]
        assert got.rows[q][: len(order)].tolist() == [union[j] for j in order]
        np.testing.assert_allclose(got.scores[q][: len(order)], [scores[j] for j in order], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rrf fuses ranks"):
        retriever.search(reps, 5, {"dense": 1.0, "sparse": 1.0}, fusion="rrf", confidence={"dense": 1.0})
    with pytest.raises(ValueError, match=r"confidence names modes \['colbert'\]"):
        retriever.search(reps, 5, {"dense": 1.0, "sparse": 1.0}, confidence={"colbert": 1.0})


def disagreeing_heads(queries: int = 60, candidates: int = 12, seed: int = 0):
    """Two heads, each right with a clear margin on half the queries and wrong but unsure on the other half:
    no fixed weighting gets more than about half right, weighting each query by the heads' confidence all."""
    rng = np.random.default_rng(seed)
    parts = np.zeros((2, queries, candidates))
    gains = np.zeros((queries, candidates))
    for q in range(queries):
        sure, unsure = (0, 1) if q % 2 == 0 else (1, 0)
        right, wrong, other = rng.choice(candidates, size=3, replace=False)
        gains[q, right] = 1
        parts[sure, q] = rng.uniform(0.0, 0.2, candidates)
        parts[sure, q, right] = 1.0
        parts[unsure, q] = rng.uniform(0.0, 0.2, candidates)
        parts[unsure, q, [wrong, other]] = [1.0, 0.95]
        parts[unsure, q, right] = 0.0
    return list(parts), np.ones((queries, candidates), dtype=bool), gains


def top1_right(parts, valid, gains, weights, confidence=None) -> float:
    fused = fuse_scores(parts, weights, valid, "none", confidence)
    return float(gains[np.arange(len(gains)), fused.argmax(1)].mean())


def test_fit_confidence_is_deterministic_and_exploits_disagreement():
    parts, valid, gains = disagreeing_heads()
    plain = max(top1_right(parts, valid, gains, [1.0, w]) for w in (0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 5.0))
    assert plain <= 0.55
    coefficients = fit_confidence(parts, valid, gains, [1.0, 1.0])
    assert coefficients == fit_confidence(parts, valid, gains, [1.0, 1.0])  # the same numbers, bit for bit
    assert all(c > 0 for c in coefficients)  # trust a head where it is sure
    assert top1_right(parts, valid, gains, [1.0, 1.0], coefficients) == 1.0
    # queries without a judged candidate are left out of the fit; none at all is an error
    more_gains = np.concatenate([gains, np.zeros((5, gains.shape[1]))])
    more_parts = [np.concatenate([p, np.full((5, p.shape[1]), 0.5)]) for p in parts]
    assert fit_confidence(more_parts, np.ones(more_gains.shape, bool), more_gains, [1.0, 1.0]) == pytest.approx(
        coefficients, rel=1e-6)
    with pytest.raises(ValueError, match="no query has a judged candidate"):
        fit_confidence(parts, valid, np.zeros_like(gains), [1.0, 1.0])
    with pytest.raises(ValueError, match="2 heads for 3 weights"):
        fit_confidence(parts, valid, gains, [1.0, 1.0, 1.0])


# ---------------------------------------------------------------------- fusion.json
#: a fusion.json as --tune-weights wrote it before calibrated fusion (the demo model's, shortened)
OLD_FILE = {"normalization": "minmax",
            "weights": {"sparse+dense": [1.0, 0.7], "colbert+sparse+dense": [1.0, 1.5, 3.0], "dense+bm25": [1.0, 0.1]},
            "tuned_on": {"dataset": "beir", "split": "dev", "queries": 244, "metric": "ndcg@10"}}


def test_fusion_json_round_trip_old_files_and_bad_coefficients(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    settings = FusionSettings("zscore", {"sparse+dense": [1, 0.5], "dense+bm25": [1.0, 0.2]}, {"split": "dev"},
                              {"sparse+dense": [0.5, -2]})
    write_fusion(folder, settings)
    written = json.loads((folder / FUSION_FILE).read_text())
    assert written["confidence"] == {"sparse+dense": [0.5, -2.0]}
    back = read_fusion(folder)
    assert back == settings and back.coefficients("sparse+dense") == [0.5, -2.0]
    assert back.coefficients("dense+bm25") is None
    # plain settings write the file they always wrote (no confidence field)
    write_fusion(folder, FusionSettings("minmax", {"dense+bm25": [1.0, 0.1]}))
    assert "confidence" not in json.loads((folder / FUSION_FILE).read_text())
    # a file from before loads, without coefficients: the same plain fusion as before
    (folder / FUSION_FILE).write_text(json.dumps(OLD_FILE))
    old = read_fusion(folder)
    assert old.confidence == {} and old.weights == OLD_FILE["weights"] and old.to_dict() == OLD_FILE
    fusion, _ = resolve_fusion(EvalConfig(modes=("colbert+sparse+dense", "dense+bm25")), folder)
    assert fusion.confidence == {} and fusion.weights["colbert+sparse+dense"] == [1.0, 1.5, 3.0]
    for confidence, pattern in (
        ({"sparse+dense": [1.0]}, r"field confidence\.sparse\+dense: .*2 coefficients"),
        ({"sparse+dense": [1.0, "x"]}, "coefficients must be numbers"),
        ({"sparse+dense": [1.0, float("inf")]}, "must be finite"),
        ({"dense+splade": [1.0, 1.0]}, "unknown fused mode 'dense\\+splade'"),
        ({"colbert+sparse+dense": [1.0, 1.0, 1.0]}, r"coefficients for \['colbert\+sparse\+dense'\], which have no"),
        ([1.0], "field 'confidence' must be an object"),
    ):
        content = {"normalization": "none", "weights": {"sparse+dense": [1, 1]}, "confidence": confidence}
        (folder / FUSION_FILE).write_text(json.dumps(content))
        with pytest.raises(InputError, match=pattern) as err:
            read_fusion(folder)
        assert str(folder / FUSION_FILE) in str(err.value)


def test_given_weights_or_normalization_fuse_plainly(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write_fusion(folder, FusionSettings("minmax", {"sparse+dense": [1.0, 0.5], "dense+bm25": [1.0, 0.2]},
                                        confidence={"sparse+dense": [1.0, 2.0], "dense+bm25": [0.5, 0.5]}))
    modes = ("sparse+dense", "dense+bm25")
    assert resolve_fusion(EvalConfig(modes=modes), folder)[0].confidence == {"sparse+dense": [1.0, 2.0],
                                                                             "dense+bm25": [0.5, 0.5]}
    given = resolve_fusion(EvalConfig(modes=modes, weights_dense_sparse=(1.0, 0.5)), folder)[0]
    assert given.confidence == {"dense+bm25": [0.5, 0.5]}  # fitted with the folder's weights only
    assert resolve_fusion(EvalConfig(modes=modes, normalization="zscore"), folder)[0].confidence == {}


# ---------------------------------------------------------------------- through the evaluation



def test_evaluation_applies_the_folder_coefficients_and_tuning_records_them(tmp_path, splade_tiny_dir, monkeypatch):
    model_dir = shutil.copytree(splade_tiny_dir, tmp_path / "model")
    data = build_manpages_beir(tmp_path / "data", pages=pages(40), seed=0, dev_fraction=0.25)
    test, dev = load_dataset(data, "test"), load_dataset(data, "dev")
    config = EvalConfig(modes=("dense", "sparse+dense"), k_values=(10,), metrics=("ndcg",), top_k=15)
    weights, confidence = [1.0, 0.5], [2.0, -1.0]
    write_fusion(model_dir, FusionSettings("minmax", {"sparse+dense": weights},
                                           confidence={"sparse+dense": confidence}))
    result = run_evaluation([model_dir], test, config, model_options=OPTIONS, return_runs=True)
    (entry,) = result["models"].values()
    assert entry["fusion"]["confidence"] == {"sparse+dense": confidence}
    from trine.evaluation import fusion_summary

    assert "sparse+dense (1, 0.5) confidence (2, -1) (model folder)" in fusion_summary(result)
    # the hand computation over the same candidates and each head's exact scores
    from trine.evaluation.runner import load_embedder

    model = load_embedder(model_dir, config, OPTIONS)
    corpus = index_corpus(model, test, config)
    qids = list(test.queries)
    texts = [test.queries[q] for q in qids]
    scored = ScoredCandidates.build(corpus, encode_queries(model, texts, config_outputs(config), config), texts,
                                    config.modes, config)
    rows = union_rows([scored.first_stage(m, config.top_k) for m in FIRST_STAGES["sparse+dense"]])
    valid = rows >= 0
    tables = [np.where(valid, scored.scorer(p)(rows), 0.0).tolist() for p in ("dense", "sparse")]
    fused = hand_calibrated(tables, weights, confidence, valid.tolist(), "minmax")
    run = entry["runs"]["sparse+dense"]
    for i, qid in enumerate(qids):
        want = sorted(((fused[i][j], corpus.doc_ids[r]) for j, r in enumerate(rows[i].tolist()) if r >= 0),
                      reverse=True)[: config.top_k]
        got = sorted(((s, d) for d, s in run[qid].items()), reverse=True)
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-5, atol=1e-6)
    plain = weighted_fusion([scored.first_stage(m, config.top_k) for m in FIRST_STAGES["sparse+dense"]],
                            [scored.scorer(p) for p in ("dense", "sparse")], weights, config.top_k,
                            normalization="minmax").to_run(qids, corpus.doc_ids)
    assert plain != run  # the coefficients changed the ranking

    # --tune-weights records the calibration it tried per mode; what it keeps is what a plain eval then uses
    tuned = run_evaluation([model_dir], test, config, model_options=OPTIONS, tune_on=dev)
    saved = read_fusion(model_dir)
    calibration = saved.tuned_on["calibration"]["sparse+dense"]
    assert saved.tuned_on["calibration_min_gain"] == CALIBRATION_MIN_GAIN
    assert calibration["kept"] == (calibration["dev_calibrated"] >= calibration["dev_plain"] + CALIBRATION_MIN_GAIN)
    assert (saved.coefficients("sparse+dense") is not None) == calibration["kept"]
    assert next(iter(tuned["models"].values()))["fusion"]["weights"] == saved.weights
    dev_run = run_evaluation([model_dir], dev, config, model_options=OPTIONS)
    assert next(iter(dev_run["models"].values()))["metrics"]["sparse+dense"]["ndcg@10"] == pytest.approx(
        saved.tuned_on["dev"]["sparse+dense"], abs=1e-9)

    # kept whatever its gain: fusion.json holds the fitted coefficients, the tuned dev nDCG@10 is what an
    # ordinary evaluation of the dev split with the file gives (so the file's coefficients were applied)
    import trine.evaluation.tuning as tuning

    monkeypatch.setattr(tuning, "CALIBRATION_MIN_GAIN", -1.0)
    run_evaluation([model_dir], test, config, model_options=OPTIONS, tune_on=dev)
    saved = read_fusion(model_dir)
    calibration = saved.tuned_on["calibration"]["sparse+dense"]
    assert calibration["kept"] and saved.coefficients("sparse+dense") == calibration["confidence"]
    assert saved.weights["sparse+dense"][0] == 1.0  # the grid's weights, under the coefficients
    dev_run = run_evaluation([model_dir], dev, config, model_options=OPTIONS)
    (dev_entry,) = dev_run["models"].values()
    assert dev_entry["fusion"]["confidence"] == {"sparse+dense": calibration["confidence"]}
    assert dev_entry["metrics"]["sparse+dense"]["ndcg@10"] == pytest.approx(saved.tuned_on["dev"]["sparse+dense"],
                                                                            abs=1e-9)
    assert saved.tuned_on["dev"]["sparse+dense"] == pytest.approx(calibration["dev_calibrated"], abs=1e-6)


def test_search_result_of_calibrated_weighted_fusion_ranks_by_fuse_scores():
    """weighted_fusion with coefficients ranks each query's union by fuse_scores' calibrated numbers."""
    lists = [SearchResult(np.array([[0.9, 0.5], [0.8, 0.2]], np.float32), np.array([[0, 1], [2, 0]])),
             SearchResult(np.array([[3.0, 1.0], [5.0, NEG]], np.float32), np.array([[2, 1], [1, -1]]))]
    a = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8]])
    b = np.array([[0.0, 1.0, 3.0], [0.5, 5.0, 0.0]])
    scorers = [lambda rows, t=t: np.where(rows >= 0, np.take_along_axis(t, np.maximum(rows, 0), 1), NEG)
               for t in (a, b)]
    res = weighted_fusion(lists, scorers, [1.0, 0.4], 3, normalization="minmax", confidence=[-1.0, 3.0])
    rows = union_rows(lists)
    fused = fuse_scores([s(rows) for s in scorers], [1.0, 0.4], rows >= 0, "minmax", [-1.0, 3.0])
    for q in range(2):
        order = np.argsort(-np.where(rows[q] >= 0, fused[q], NEG), kind="stable")[: (rows[q] >= 0).sum()]
        assert res.rows[q][: len(order)].tolist() == rows[q][order].tolist()
