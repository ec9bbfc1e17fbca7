"""BM25 (bm25s) as the classical baseline: the index's scores are the package's own, and `trine eval
--modes bm25` reports pytrec_eval's metrics of the run bm25s makes directly."""

from __future__ import annotations

import json
import math
import os

import bm25s
import numpy as np
import pytest
import pytrec_eval
import Stemmer

from trine.cli import main
from trine.evaluation import EvalConfig, evaluate_model
from trine.evaluation.data import load_dataset
from trine.retrieval import BM25Index, HybridRetriever, check_index, load_index

DOCS = {
    "d1": "chmod changes the file mode bits of each given file",
    "d2": "malloc allocates size bytes of memory and returns a pointer to the allocated memory",
    "d3": "ls lists information about the files in a directory",
    "d4": "free releases the memory space pointed to by a pointer",
    "d5": "mkdir creates directories; chmod and chown change modes and owners of files",
    "d6": "the the of and",  # stop-words only: no terms at all
}
QUERIES = {"q1": "change the mode of a file", "q2": "allocating memory", "q3": "list directory files",
           "q4": "the of"}  # q4: stop-words only
QRELS = {"q1": {"d1": 1, "d5": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}, "q4": {"d4": 1}}


def direct_bm25(texts: list[str]) -> bm25s.BM25:
    """bm25s used as its README shows: English stop-words, English Snowball stemmer, default parameters."""
    tokens = bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False,
                            show_progress=False)
    model = bm25s.BM25()
    model.index(tokens, show_progress=False)
    return model


def query_terms(model: bm25s.BM25, text: str) -> list[str]:
    (terms,) = bm25s.tokenize([text], stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False,
                              show_progress=False)
    return [t for t in terms if t in model.vocab_dict]


def test_tokenisation_lowercases_drops_stop_words_and_stems():
    index = BM25Index()
    assert index.tokenize(["The cats ARE running to their Directories", "the of"]) == [
        ["cat", "run", "directori"], []]


def test_scores_equal_the_package_own_and_the_formula():
    ids, texts = list(DOCS), list(DOCS.values())
    index = BM25Index.build(texts, ids)
    check_index(index, "text")
    model = direct_bm25(texts)
    queries = list(QUERIES.values())
    all_rows = np.tile(np.arange(len(ids)), (len(queries), 1))
    got = index.score(queries, all_rows)
    for i, q in enumerate(queries):
        terms = query_terms(model, q)
        expected = model.get_scores(terms) if terms else np.zeros(len(ids))
        np.testing.assert_allclose(got[i], expected, rtol=1e-6)
    assert got[0].max() > 0 and not got[3].any()  # something matches q1; stop-words only match nothing
    # the Lucene BM25 of q2 ("alloc", "memori") on d2 by hand: idf * tf / (tf + k1 (1 - b + b dl/avgdl))
    # (Lucene since version 8 drops the constant factor k1 + 1; the ranking is the same)
    lengths = [len(t) for t in index.tokenize(texts)]
    n, avgdl, k1, b = len(texts), sum(lengths) / len(texts), 1.5, 0.75

    def term(tf: int, df: int, dl: int) -> float:
        return math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * dl / avgdl))

    # d2 has "alloc" twice (allocates, allocated) in 1 document, "memori" twice in 2 documents (d2, d4)
    assert got[1, 1] == pytest.approx(term(2, 1, lengths[1]) + term(2, 2, lengths[1]), rel=1e-5)
    # search: the documents sharing a term, best first, exactly the scores `score` gives
    res = index.search(queries, 3)
    for i in range(len(queries)):
        positive = np.flatnonzero(got[i] > 0)
        best = positive[np.lexsort((positive, -got[i][positive]))][:3]
        assert res.rows[i][res.rows[i] >= 0].tolist() == best.tolist()
        np.testing.assert_allclose(res.scores[i][: best.size], got[i][best], rtol=1e-6)
    assert res.rows[3].tolist() == [-1, -1, -1]


def test_add_save_and_load_keep_the_scores(tmp_path):
    ids, texts = list(DOCS), list(DOCS.values())
    whole = BM25Index.build(texts, ids)
    grown = BM25Index.build(texts[:2], ids[:2])
    grown.add(texts[2:], ids[2:])
    with pytest.raises(ValueError, match="unique"):
        grown.add(["another text"], ["d1"])
    with pytest.raises(TypeError, match=r"docs\[1\] is a int"):
        grown.add(["fine", 3], ["x", "y"])
    assert list(grown.ids) == ids and len(grown) == len(ids)  # unchanged by the refused adds
    queries = list(QUERIES.values())
    np.testing.assert_array_equal(grown.search(queries, 4).rows, whole.search(queries, 4).rows)
    whole.save(tmp_path / "bm25")
    loaded = load_index(tmp_path / "bm25")
    assert isinstance(loaded, BM25Index) and list(loaded.ids) == ids and loaded.options == whole.options
    before, after = whole.search(queries, 4), loaded.search(queries, 4)
    np.testing.assert_array_equal(before.rows, after.rows)
    np.testing.assert_array_equal(before.scores, after.scores)
    with pytest.raises(ValueError, match="Snowball"):
        BM25Index(stemmer="klingon")
    # a text index is not one of the hybrid retriever's encoded modes
    with pytest.raises(ValueError, match="unknown mode 'text'"):
        HybridRetriever(indexes={"text": whole})


def write_beir(path) -> str:
    os.makedirs(os.path.join(path, "qrels"))
    with open(os.path.join(path, "corpus.jsonl"), "w") as f:
        for i, t in DOCS.items():
            f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
    with open(os.path.join(path, "queries.jsonl"), "w") as f:
        for i, t in QUERIES.items():
            f.write(json.dumps({"_id": i, "text": t}) + "\n")
    with open(os.path.join(path, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, docs in QRELS.items():
            for d, r in docs.items():
                f.write(f"{q}\t{d}\t{r}\n")
    return str(path)


def test_eval_reports_bm25_beside_the_model_as_pytrec_eval_scores_the_bm25s_run(tmp_path, capsys,
                                                                                 splade_tiny_dir):
    data = write_beir(tmp_path / "beir")
    top_k = 3
    rc = main(["eval", "--data", data, "--model", splade_tiny_dir, "--heads", "neutral", "--modes", "dense,bm25",
               "--k", "1,3", "--metrics", "ndcg,recall", "--top-k", str(top_k), "--quiet",
               "--out", str(tmp_path / "report")])
    assert rc == 0
    assert "bm25" in capsys.readouterr().out
    with open(tmp_path / "report" / "results.json") as f:
        (entry,) = json.load(f)["models"].values()
    assert set(entry["metrics"]) == {"dense", "bm25"}
    # the run bm25s makes by itself (its own top k; documents without a shared term score 0 and are left out)
    model = direct_bm25(list(DOCS.values()))
    ids = list(DOCS)
    run = {}
    for qid, text in QUERIES.items():
        terms = query_terms(model, text)
        if not terms:
            run[qid] = {}
            continue
        rows, scores = model.retrieve([terms], k=top_k, show_progress=False)
        run[qid] = {ids[r]: float(s) for r, s in zip(rows[0], scores[0]) if s > 0}
    judged = {q: {d: r for d, r in docs.items()} for q, docs in QRELS.items()}
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.1,3", "recall.1,3"}).evaluate(
        {q: docs for q, docs in run.items() if docs})
    for name, measure in (("ndcg@1", "ndcg_cut_1"), ("ndcg@3", "ndcg_cut_3"), ("recall@1", "recall_1"),
                          ("recall@3", "recall_3")):
        # a query with no result counts 0 in trine's mean (pytrec_eval leaves it out)
        expected = sum(per_query.get(q, {}).get(measure, 0.0) for q in QRELS) / len(QRELS)
        assert entry["metrics"]["bm25"][name] == pytest.approx(expected, abs=1e-9), name
    assert 0 < entry["metrics"]["bm25"]["ndcg@3"] < 1


def test_bm25_alone_needs_no_model_output(tmp_path):
    class NoModel:
        def encode_result(self, *args, **kwargs):
            raise AssertionError("bm25 alone must not encode anything")

    dataset = load_dataset(write_beir(tmp_path / "beir"), "test", "beir")
    out = evaluate_model(NoModel(), dataset, EvalConfig(modes=["bm25"], k_values=[1, 3], metrics=["ndcg"],
                                                        top_k=3), return_runs=True)
    assert set(out["metrics"]) == {"bm25"}
    assert list(out["runs"]["bm25"]["q2"])[0] == "d2" and out["runs"]["bm25"]["q4"] == {}
