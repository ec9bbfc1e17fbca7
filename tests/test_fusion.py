"""Scale-aware fusion: score normalization, fusion settings in the model folder, tuning on a dev split, dense+bm25."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from trine.errors import InputError, OptionError, OutputPathError
from trine.evaluation import EvalConfig, build_manpages_beir, evaluate_model, evaluate_run, load_dataset, run_evaluation
from trine.evaluation.data import RetrievalDataset
from trine.evaluation.tuning import _FastNdcg, tune_fusion
from trine.inference.encoder import Encoder
from trine.inference.result import EncodeResult
from trine.modeling.fusion import FUSION_FILE, FusionSettings, read_fusion, write_fusion
from trine.retrieval import (
    BM25Index,
    DenseIndex,
    HybridRetriever,
    QueryReps,
    SearchResult,
    SparseIndex,
    weighted_fusion,
)
from trine.retrieval.hybrid import rank_candidates
from trine.scoring import NORMALIZATIONS, normalize_scores

NEG = -np.inf


# ---------------------------------------------------------------------- normalization
def test_normalize_scores_by_hand_with_padding():
    scores = np.array([[3.0, 1.0, 2.0, NEG], [5.0, 5.0, NEG, NEG], [NEG, NEG, NEG, NEG], [-1.0, 7.0, 1.0, 9.0]])
    valid = np.isfinite(scores)
    valid[3, 3] = False  # a padding cell holding a number: left out and 0
    mm = normalize_scores(scores, valid, "minmax")
    np.testing.assert_allclose(mm, [[1, 0, 0.5, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0.25, 0]])
    z = normalize_scores(scores, valid, "zscore")
    s0 = math.sqrt(2 / 3)  # population std of 3, 1, 2
    s3 = math.sqrt(((-1 - 7 / 3) ** 2 + (7 - 7 / 3) ** 2 + (1 - 7 / 3) ** 2) / 3)
    np.testing.assert_allclose(z, [[1 / s0, -1 / s0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0],
                                   [(-1 - 7 / 3) / s3, (7 - 7 / 3) / s3, (1 - 7 / 3) / s3, 0]])
    # the default mask is the finite cells; "none" leaves the scores as they are
    np.testing.assert_allclose(normalize_scores(scores[:3], method="minmax"), mm[:3])
    np.testing.assert_array_equal(normalize_scores(scores, valid, "none"), scores)
    with pytest.raises(ValueError, match=r"unknown score normalization 'l2'.*'none', 'minmax', 'zscore'"):
        normalize_scores(scores, valid, "l2")
    with pytest.raises(ValueError, match="not finite"):
        normalize_scores(np.array([[1.0, np.nan]]), np.array([[True, True]]))


def hand_fusion(candidate_rows, tables, weights, method, k):
    """Per query: the union of candidate rows, each mode's table normalised over it, weighted, sorted."""
    out = []
    for q, lists in enumerate(candidate_rows):
        union = sorted({r for rows in lists for r in rows})
        total = np.zeros(len(union))
        for table, w in zip(tables, weights):
            s = np.array([table[q][r] for r in union], dtype=np.float64)
            if method == "minmax":
                s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.zeros_like(s)
            elif method == "zscore":
                s = (s - s.mean()) / s.std() if s.std() > 0 else np.zeros_like(s)
            total += w * s
        order = sorted(range(len(union)), key=lambda j: (-total[j], union[j]))[:k]
        out.append(([union[j] for j in order], [total[j] for j in order]))
    return out


@pytest.mark.parametrize("method", NORMALIZATIONS)
def test_weighted_fusion_normalises_each_mode_over_the_union(method):
    dense = np.array([[0.9, 0.8, 0.1, 0.3, 0.2], [0.2, 0.7, 0.6, 0.1, 0.5]])
    sparse = np.array([[0.0, 4.0, 9.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    # query 1's sparse list has one row (padding): its union has 3 candidates, query 0's has 3 too
    candidates = [SearchResult(np.array([[0.9, 0.8], [0.7, 0.6]], np.float32), np.array([[0, 1], [1, 2]])),
                  SearchResult(np.array([[9.0, 4.0], [3.0, NEG]], np.float32), np.array([[2, 1], [0, -1]]))]

    def scorer(table):
        return lambda rows: np.where(rows >= 0, np.take_along_axis(table, np.maximum(rows, 0), 1), NEG)

    got = weighted_fusion(candidates, [scorer(dense), scorer(sparse)], [1.0, 0.5], 3, normalization=method)
    expected = hand_fusion([[[0, 1], [2, 1]], [[1, 2], [0]]], [dense, sparse], [1.0, 0.5], method, 3)
    for q, (rows, scores) in enumerate(expected):
        assert got.rows[q].tolist() == rows
        np.testing.assert_allclose(got.scores[q], scores, rtol=1e-6, atol=1e-6)
    if method == "none":  # FlagEmbedding's raw sum, as before
        assert got.rows[0].tolist() == [2, 1, 0] and got.scores[0][0] == pytest.approx(0.1 + 0.5 * 9)


def test_hybrid_retriever_normalization_equals_hand_fusion():
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
    k = 4
    first = [retriever.first_stage(reps, m, k) for m in ("dense", "sparse")]
    lists = [[[r for r in res.rows[q].tolist() if r >= 0] for res in first] for q in range(3)]
    for method in ("minmax", "zscore"):
        got = retriever.search(reps, 5, {"dense": 1.0, "sparse": 0.7}, candidate_k=k, normalization=method)
        for q, (rows, scores) in enumerate(hand_fusion(lists, [dense, sparse], [1.0, 0.7], method, 5)):
            assert got.rows[q][: len(rows)].tolist() == rows
            np.testing.assert_allclose(got.scores[q][: len(rows)], scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rrf fuses ranks"):
        retriever.search(reps, 5, {"dense": 1.0, "sparse": 1.0}, fusion="rrf", normalization="minmax")
    with pytest.raises(ValueError, match="unknown score normalization"):
        retriever.search(reps, 5, {"dense": 1.0, "sparse": 1.0}, normalization="max")


def test_fast_ndcg_equals_pytrec_eval():
    """The grid search's numpy nDCG@10 is pytrec_eval's on the same fused ranking (ties included)."""
    rng = np.random.default_rng(1)
    doc_ids = [f"d{i:02d}" for i in range(30)]
    qids = [f"q{i}" for i in range(8)]
    rows = np.full((8, 14), -1)
    for i in range(8):
        n = 14 - i % 3 if i != 2 else 10  # queries with fewer candidates: padding
        rows[i, :n] = np.sort(rng.choice(30, size=n, replace=False))
    qrels = {q: {doc_ids[r]: int(rng.integers(1, 3)) for r in rng.choice(30, size=3, replace=False)} for q in qids}
    dev = RetrievalDataset({d: {"title": "", "text": d} for d in doc_ids}, {q: q for q in qids}, qrels, split="dev")
    fast = _FastNdcg(rows, dev, qids, doc_ids, top_k=12, ignore_identical_ids=False)
    for scores in (rng.normal(size=rows.shape), np.round(rng.normal(size=rows.shape), 1)):  # the second has ties
        res = rank_candidates(rows, scores, 12)
        ref = evaluate_run(qrels, res.to_run(qids, doc_ids), [10], ["ndcg"])["ndcg@10"]
        assert fast(scores[None])[0] == pytest.approx(ref, abs=1e-9)


# ---------------------------------------------------------------------- fusion.json
def test_fusion_settings_round_trip_and_bad_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert read_fusion(folder) is None
    settings = FusionSettings("zscore", {"sparse+dense": [1, 0.5], "dense+bm25": [1.0, 0.2]}, {"split": "dev"})
    path = write_fusion(folder, settings)
    assert path == str(folder / FUSION_FILE)
    back = read_fusion(folder)
    assert back == FusionSettings("zscore", {"sparse+dense": [1.0, 0.5], "dense+bm25": [1.0, 0.2]}, {"split": "dev"})
    assert sorted(os.listdir(folder)) == [FUSION_FILE]  # no temp file left
    # never into a folder that is not there
    with pytest.raises(OutputPathError, match="not an existing model folder"):
        write_fusion(tmp_path / "missing", settings)
    assert not (tmp_path / "missing").exists()
    for content, pattern in (
        ("{", "not valid JSON"),
        ('{"weights": {}}', "field 'normalization' is missing"),
        ('{"normalization": "l2", "weights": {}}', "field normalization: unknown 'l2'"),
        ('{"normalization": "none", "weights": {"sparse+dense": [1]}}', r"field weights\.sparse\+dense: .*2 weights"),
        ('{"normalization": "none", "weights": {"sparse+dense": [0, 0]}}', "all 0"),
        ('{"normalization": "none", "weights": {"dense+splade": [1, 1]}}', "unknown fused mode 'dense\\+splade'"),
        ('{"normalization": "none", "weight": {}}', r"unknown field\(s\) \['weight'\]"),
    ):
        (folder / FUSION_FILE).write_text(content)
        with pytest.raises(InputError, match=pattern) as err:
            read_fusion(folder)
        assert str(folder / FUSION_FILE) in str(err.value)
    with pytest.raises(ValueError, match="unknown normalization"):
        EvalConfig(normalization="l2")
    with pytest.raises(ValueError, match="weights_dense_bm25"):
        EvalConfig(weights_dense_bm25=(1.0,))


@pytest.fixture()
def model_dir(tmp_path, splade_tiny_dir):
    """A writable copy of the tiny model (tuning writes fusion.json into it)."""
    return shutil.copytree(splade_tiny_dir, tmp_path / "model")


OPTIONS = {"init_missing_heads": "neutral", "show_progress": False, "devices": "cpu"}


def pages(n):
    """Man-page-like data where each query shares words with several pages: retrieval is not trivial."""
    from trine.datasets.manpages import ManPage

    topics = ["copy files", "list directory", "print text", "compress data", "network socket", "change mode",
              "show processes", "search patterns", "format output", "manage users"]
    words = ["quickly", "recursively", "safely", "remote", "local", "binary", "unicode", "large", "hidden",
             "archived", "shared", "temporary", "encrypted"]
    return [ManPage(f"tool{i}.1", f"{topics[i % 10]} {words[i % 13]}",
                    f"This command can {topics[(i * 3 + 1) % 10]} for {words[(i * 7) % 13]} items; it may also "
                    f"{topics[i % 10]} when {words[i % 13]} or {words[(i + 5) % 13]}.")
            for i in range(n)]


def test_run_evaluation_reads_the_model_folder_settings(tmp_path, model_dir):
    test = load_dataset(build_manpages_beir(tmp_path / "data", pages=pages(30), seed=0), "test")
    config = dict(modes=("dense", "sparse+dense"), k_values=(1, 10), metrics=("ndcg",), top_k=15)
    default = run_evaluation([model_dir], test, EvalConfig(**config), model_options=OPTIONS, return_runs=True)
    (entry,) = default["models"].values()
    assert entry["fusion"] == {"normalization": "none", "weights": {"sparse+dense": [1.0, 0.3]}, "tuned_on": None,
                               "source": {"normalization": "default", "weights": {"sparse+dense": "default"}}}
    write_fusion(model_dir, FusionSettings("minmax", {"sparse+dense": [1.0, 2.0]}, {"split": "dev"}))
    saved = run_evaluation([model_dir], test, EvalConfig(**config), model_options=OPTIONS, return_runs=True)
    given = run_evaluation([model_dir], test, EvalConfig(**config, normalization="minmax", weights_dense_sparse=(1, 2)),
                           model_options=OPTIONS, return_runs=True)
    (s_entry,), (g_entry,) = saved["models"].values(), given["models"].values()
    assert s_entry["fusion"]["source"] == {"normalization": "model folder", "weights": {"sparse+dense": "model folder"}}
    assert s_entry["fusion"]["tuned_on"] == {"split": "dev"}
    assert g_entry["fusion"]["source"] == {"normalization": "given", "weights": {"sparse+dense": "given"}}
    assert s_entry["runs"]["sparse+dense"] == g_entry["runs"]["sparse+dense"]  # the file's settings were used
    assert s_entry["runs"]["sparse+dense"] != entry["runs"]["sparse+dense"]


# ---------------------------------------------------------------------- tuning
def test_tune_weights_writes_the_folder_and_the_test_uses_them(tmp_path, model_dir, monkeypatch):
    data = build_manpages_beir(tmp_path / "data", pages=pages(40), seed=0, dev_fraction=0.25)
    test, dev = load_dataset(data, "test"), load_dataset(data, "dev")
    passages = []
    encode = Encoder.encode_result

    def counting(self, texts, *args, **kwargs):
        if kwargs.get("kind") == "passage":
            passages.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_result", counting)
    config = EvalConfig(modes=("dense", "sparse+dense", "dense+bm25"), k_values=(1, 10), metrics=("ndcg",), top_k=15)
    result = run_evaluation([model_dir], test, config, model_options=OPTIONS, tune_on=dev)
    assert passages == [40]  # the corpus was encoded once, for tuning and test alike
    (entry,) = result["models"].values()
    saved = read_fusion(model_dir)
    assert entry["tuning"]["file"] == os.path.join(model_dir, FUSION_FILE)
    assert saved.normalization in ("minmax", "zscore") and set(saved.weights) == {"sparse+dense", "dense+bm25"}
    assert all(w[0] == 1.0 for w in saved.weights.values())
    assert saved.tuned_on["split"] == "dev" and saved.tuned_on["queries"] == 10
    assert entry["fusion"]["source"] == {"normalization": "model folder",
                                         "weights": {"sparse+dense": "model folder", "dense+bm25": "model folder"}}
    assert entry["fusion"]["weights"] == saved.weights
    # the dev nDCG@10 recorded is what an ordinary evaluation of the dev split with the saved settings gives
    again = run_evaluation([model_dir], dev, EvalConfig(modes=("sparse+dense", "dense+bm25"), k_values=(10,),
                                                        metrics=("ndcg",), top_k=15), model_options=OPTIONS)
    (dev_entry,) = again["models"].values()
    for mode in ("sparse+dense", "dense+bm25"):
        assert dev_entry["metrics"][mode]["ndcg@10"] == pytest.approx(saved.tuned_on["dev"][mode], abs=1e-9)
        assert 0 < saved.tuned_on["dev"][mode] <= 1


def test_tune_fusion_python_api_and_grid_optimum(tmp_path, splade_tiny_dir):
    from trine import M3Embedder

    data = build_manpages_beir(tmp_path / "data", pages=pages(30), seed=1, dev_fraction=0.3)
    dev = load_dataset(data, "dev")
    model = M3Embedder(splade_tiny_dir, **OPTIONS)
    config = EvalConfig(modes=("sparse+dense",), k_values=(10,), metrics=("ndcg",), top_k=12)
    grid = (0.0, 0.3, 1.0, 3.0)
    settings = tune_fusion(model, dev, config, grid=grid, normalizations=("zscore",), calibrate=False)
    assert settings.normalization == "zscore" and settings.tuned_on["grid"] == list(grid)
    # no other weight on the grid does better on dev (pytrec_eval through an ordinary evaluation)
    best = settings.tuned_on["dev"]["sparse+dense"]
    for w in grid:
        res = evaluate_model(model, dev, EvalConfig(modes=("sparse+dense",), k_values=(10,), metrics=("ndcg",),
                                                    top_k=12, normalization="zscore", weights_dense_sparse=(1, w)))
        value = res["metrics"]["sparse+dense"]["ndcg@10"]
        assert value <= best + 1e-9
        if w < settings.weights["sparse+dense"][1]:
            assert value < best - 1e-12  # ties go to the smaller weight


def test_tuning_refuses_the_test_split_and_shared_queries(tmp_path, model_dir):
    data = build_manpages_beir(tmp_path / "data", pages=pages(30), seed=0, dev_fraction=0.2)
    test, dev = load_dataset(data, "test"), load_dataset(data, "dev")
    config = EvalConfig(modes=("dense", "sparse+dense"), k_values=(1, 10), top_k=15)
    with pytest.raises(InputError, match="is the evaluated split"):
        run_evaluation([model_dir], test, config, tune_on=load_dataset(data, "test"))
    q = next(iter(test.queries))
    leaky = RetrievalDataset(dev.corpus, {**dev.queries, q: test.queries[q]}, {**dev.qrels, q: test.qrels[q]},
                             split="dev")
    with pytest.raises(InputError, match="shares 1 query id"):
        run_evaluation([model_dir], test, config, tune_on=leaky)
    with pytest.raises(OptionError, match="do not also give weights_dense_sparse"):
        run_evaluation([model_dir], test, EvalConfig(modes=("sparse+dense",), weights_dense_sparse=(1, 1)),
                       tune_on=dev)
    with pytest.raises(OptionError, match="needs a fused mode"):
        run_evaluation([model_dir], test, EvalConfig(modes=("dense",)), tune_on=dev)

    class InMemory(Encoder):
        def __init__(self):
            pass

    with pytest.raises(OptionError, match="give model folders"):
        run_evaluation([InMemory()], test, config, tune_on=dev)
    assert not os.path.exists(os.path.join(model_dir, FUSION_FILE))


def test_cli_tune_weights(tmp_path, model_dir, capsys):
    from trine.cli import main

    data = build_manpages_beir(tmp_path / "data", pages=pages(30), seed=0, dev_fraction=0.2)
    argv = ["eval", "--data", data, "--model", str(model_dir), "--heads", "neutral", "--quiet", "--modes",
            "dense,sparse+dense", "--k", "1,10", "--top-k", "15"]
    assert main([*argv, "--tune-weights", "--dev-split", "test"]) == 2
    assert "is the evaluated split" in capsys.readouterr().err
    assert main([*argv, "--tune-weights", "--weights-dense-sparse", "1,1"]) == 2
    assert "do not also give" in capsys.readouterr().err
    assert main([*argv, "--tune-weights", "--normalization", "minmax", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "tuned model on data/dev (6 queries), normalization minmax: sparse+dense (1, " in printed
    assert "dev ndcg@10" in printed and "(model folder)" in printed
    with open(tmp_path / "out" / "results.json") as f:
        entry = json.load(f)["models"]["model"]
    assert entry["tuning"]["normalization"] == "minmax" == read_fusion(model_dir).normalization
    assert "dev ndcg@10" in (tmp_path / "out" / "results.md").read_text()
    # a later plain eval reads them back from the folder
    assert main(argv) == 0
    assert "fusion model: normalization minmax (model folder)" in capsys.readouterr().out


# ---------------------------------------------------------------------- dense+bm25
class TableEncoder:
    """Dense vectors looked up by text: a model whose scores a test can compute by hand."""

    def __init__(self, table):
        self.table = table

    def encode_result(self, texts, outputs, **kwargs):
        assert set(outputs) == {"dense"}
        return EncodeResult(dense_vecs=np.array([self.table[t] for t in texts], dtype=np.float32))


def test_dense_bm25_equals_hand_fusion(tmp_path):
    docs = {"d1": "copy files from one directory to another", "d2": "list the files of a directory",
            "d3": "print formatted text to the terminal", "d4": "compress files with gzip",
            "d5": "open a network socket", "d6": "change the mode bits of files"}
    queries = {"q1": "copy directory files", "q2": "print text", "q3": "network"}
    os.makedirs(tmp_path / "qrels")
    with open(tmp_path / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs.items())
    with open(tmp_path / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items())
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\nq3\td5\t1\n")
    dataset = load_dataset(tmp_path, "test")
    rng = np.random.default_rng(3)
    table = {t: rng.normal(size=4) for t in [*docs.values(), *queries.values()]}
    k = 3
    ids, texts = list(docs), list(docs.values())
    bm25 = BM25Index.build(texts, ids)
    for norm, weights in (("minmax", (1.0, 0.5)), ("zscore", (1.0, 2.0)), ("none", (1.0, 1.0))):
        config = EvalConfig(modes=("dense+bm25",), k_values=(1, 3), metrics=("ndcg",), top_k=k, normalization=norm,
                            weights_dense_bm25=None if norm == "none" else weights)
        run = evaluate_model(TableEncoder(table), dataset, config, return_runs=True)["runs"]["dense+bm25"]
        for qid, qtext in queries.items():
            dense = np.array([np.dot(table[qtext], table[t]) for t in texts])
            lexical = bm25.score_all(qtext)
            dense_top = sorted(range(6), key=lambda r: (-dense[r], r))[:k]
            bm25_top = [r for r in sorted(range(6), key=lambda r: (-lexical[r], r)) if lexical[r] > 0][:k]
            ((rows, scores),) = hand_fusion([[dense_top, bm25_top]], [dense[None], lexical[None]], weights, norm, k)
            assert list(run[qid]) == [ids[r] for r in rows], (norm, qid)
            np.testing.assert_allclose(list(run[qid].values()), scores, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- trine index search
def test_index_search_fuses_with_the_model_folders_settings(tmp_path, model_dir, capsys):
    """`trine index search` fuses as eval and /search do: fusion.json's weights, normalization and calibrated
    coefficients when the folder has them; --weights fuse plainly (with the file's normalization)."""
    from trine import M3Embedder
    from trine.cli import main

    data = build_manpages_beir(tmp_path / "data", pages=pages(30), seed=0)
    uri = str(tmp_path / "idx")
    model_dir = str(model_dir)
    assert main(["index", "build", "--model", model_dir, "--heads", "neutral", "--corpus",
                 os.path.join(data, "corpus.jsonl"), "--uri", uri, "--passage_max_len", "64", "--quiet"]) == 0
    query = "copy files recursively"
    encoder = M3Embedder(model_dir, init_missing_heads="neutral", show_progress=False, query_max_length=64)
    retriever = HybridRetriever.load(uri)
    reps = QueryReps.from_encode(dict(encoder.encode_result([query], ("dense", "sparse"), kind="query")))

    def search(*extra):
        capsys.readouterr()
        assert main(["index", "search", "--model", model_dir, "--heads", "neutral", "--uri", uri, "--query", query,
                     "--mode", "sparse+dense", "--k", "6", "--query_max_len", "64", "--quiet", *extra]) == 0
        return [(h["id"], h["score"]) for h in json.loads(capsys.readouterr().out.strip())["hits"]]

    def reference(weights, normalization="none", confidence=None):
        found = retriever.search_mode(reps, "sparse+dense", 6, weights=dict(zip(("dense", "sparse"), weights)),
                                      normalization=normalization, confidence=confidence)
        return [(retriever.ids[r], round(float(s), 6)) for r, s in zip(found.rows[0], found.scores[0]) if r >= 0]

    def same(got, want):
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)

    same(search(), reference((1.0, 0.3)))  # no fusion.json: the BGE-M3 paper's weights, raw scores
    write_fusion(model_dir, FusionSettings("minmax", {"sparse+dense": [1.0, 2.0]}, {"split": "dev"},
                                           {"sparse+dense": [3.0, -1.0]}))
    calibrated = search()
    same(calibrated, reference((1.0, 2.0), "minmax", {"dense": 3.0, "sparse": -1.0}))
    plain = search("--weights", "1,2")
    same(plain, reference((1.0, 2.0), "minmax"))
    assert calibrated != plain
