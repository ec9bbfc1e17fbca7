"""Evaluation: loaders (BEIR and FlagEmbedding custom layouts), metrics against pytrec_eval, runner, report, CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import pytrec_eval
from conftest import unavailable

from trine.datasets.manpages import ManPage
from trine.evaluation import (
    DatasetFormatError,
    EvalConfig,
    build_manpages_beir,
    evaluate_run,
    load_dataset,
    run_evaluation,
    text_table,
    truncate_run,
    write_report,
)
from trine.io import MARKER

# ---------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d5": 2}}
    run = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.1, "d4": 0.05}}  # q2 unanswered: counts 0
    got = evaluate_run(qrels, run, k_values=[1, 3], metrics=["ndcg", "recall", "mrr", "map", "precision"])
    ndcg3 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    expected = {
        "ndcg@1": 0.0, "ndcg@3": ndcg3 / 2,
        "recall@1": 0.0, "recall@3": 1.0 / 2,
        "mrr@1": 0.0, "mrr@3": 0.5 / 2,
        "map@1": 0.0, "map@3": (1 / 2 + 2 / 3) / 2 / 2,
        "precision@1": 0.0, "precision@3": (2 / 3) / 2,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key


def test_metrics_equal_pytrec_eval_run_independently():
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(60)]
    qrels = {f"q{i}": {d: int(rng.integers(1, 3)) for d in rng.choice(docs, size=rng.integers(1, 5), replace=False)}
             for i in range(25)}
    run = {q: {d: float(np.round(rng.random(), 1)) for d in rng.choice(docs, size=30, replace=False)} for q in qrels}
    ks = [1, 5, 10, 20]
    got, per_query = evaluate_run(qrels, run, ks, ["ndcg", "recall", "map", "precision", "mrr"], per_query=True)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,5,10,20", "recall.1,5,10,20", "map_cut.1,5,10,20",
                                                 "P.1,5,10,20"}).evaluate(run)
    for k in ks:
        for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("map", "map_cut"), ("precision", "P")):
            assert got[f"{ours}@{k}"] == pytest.approx(np.mean([ref[q][f"{theirs}_{k}"] for q in qrels]), abs=1e-12)
    # MRR@k by hand: first relevant rank within k, ties ordered as trec_eval (document id descending)
    for q in qrels:
        ranked = sorted(run[q].items(), key=lambda x: x[0], reverse=True)
        ranked = sorted(ranked, key=lambda x: -x[1])  # stable: ties keep document id descending
        first = next((i + 1 for i, (d, _) in enumerate(ranked) if qrels[q].get(d, 0) > 0), None)
        for k in ks:
            expected = 1 / first if first is not None and first <= k else 0.0
            assert per_query[q][f"mrr@{k}"] == pytest.approx(expected), (q, k)
    full = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    assert got["mrr@20"] <= np.mean([full[q]["recip_rank"] for q in qrels]) + 1e-12


def test_truncate_run_and_options():
    run = {"q": {"a": 1.0, "b": 1.0, "c": 2.0}}
    assert list(truncate_run(run, 2)["q"]) == ["c", "b"]
    qrels = {"q": {"q": 1, "a": 1}}
    assert evaluate_run(qrels, {"q": {"q": 2.0, "a": 1.0}}, [1], ["precision"])["precision@1"] == 1.0
    assert evaluate_run(qrels, {"q": {"q": 2.0, "a": 1.0}}, [1], ["precision"],
                        ignore_identical_ids=True)["precision@1"] == 1.0
    assert evaluate_run({"q": {"a": 1}}, {"q": {"q": 2.0, "a": 1.0}}, [1], ["precision"],
                        ignore_identical_ids=True)["precision@1"] == 1.0
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_run(qrels, run, [1], ["ndcg", "bleu"])
    with pytest.raises(ValueError, match="positive"):
        evaluate_run(qrels, run, [0])


# ---------------------------------------------------------------------- loading
CORPUS = [("d1", "Title one", "first text"), ("d2", "", "second text"), ("d3", "T3", "third")]
QUERIES = [("q1", "query one"), ("q2", "query two"), ("q3", "not judged in test")]
QRELS = [("q1", "d1", 1), ("q1", "d3", 2), ("q2", "d2", 1)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def make_beir(folder, qrels_lines=None, corpus=None):
    os.makedirs(folder / "qrels", exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", corpus or [{"_id": i, "title": t, "text": x} for i, t, x in CORPUS])
    write_jsonl(folder / "queries.jsonl", [{"_id": i, "text": t} for i, t in QUERIES])
    lines = qrels_lines or ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{r}" for q, d, r in QRELS]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def make_custom(folder, corpus=None, qrels=None):
    os.makedirs(folder, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", corpus or [{"id": i, "title": t, "text": x} for i, t, x in CORPUS])
    write_jsonl(folder / "test_queries.jsonl", [{"id": i, "text": t} for i, t in QUERIES])
    write_jsonl(folder / "test_qrels.jsonl", qrels or [{"qid": q, "docid": d, "relevance": r} for q, d, r in QRELS])
    return folder


def test_both_layouts_load_the_same(tmp_path):
    beir = load_dataset(make_beir(tmp_path / "beir"))
    custom = load_dataset(make_custom(tmp_path / "custom"))
    assert (beir.layout, custom.layout) == ("beir", "custom")
    for ds in (beir, custom):
        assert ds.queries == {"q1": "query one", "q2": "query two"}  # q3 has no judgement in the split
        assert ds.qrels == {"q1": {"d1": 1, "d3": 2}, "q2": {"d2": 1}}
        assert ds.passages() == (["d1", "d2", "d3"], ["Title one first text", "second text", "T3 third"])
    assert load_dataset(tmp_path / "beir", layout="beir").corpus == beir.corpus
    with pytest.raises(DatasetFormatError, match="neither qrels/dev.tsv"):
        load_dataset(tmp_path / "beir", split="dev")
    with pytest.raises(ValueError, match="layout must be"):
        load_dataset(tmp_path / "beir", layout="msmarco")


@pytest.mark.parametrize("corpus,pattern", [
    (['{"_id": "d1", "text": "ok"}', '{"_id": "d2", "text": '], r"corpus\.jsonl:2: \(line\): not valid JSON"),
    ([{"_id": "d1", "text": "ok"}, {"_id": "d2", "title": "x"}], r"corpus\.jsonl:2: field 'text' is missing"),
    ([{"_id": "d1", "text": 5}], r"corpus\.jsonl:1: field 'text' must be str"),
    ([{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}], r"corpus\.jsonl:2: field '_id': duplicate id"),
    ([{"id": "d1", "text": "a"}], r"corpus\.jsonl:1: field '_id' is missing"),
    (["[1, 2]"], r"corpus\.jsonl:1: \(line\): a record must be a JSON object"),
])
def test_bad_corpus_names_file_line_field(tmp_path, corpus, pattern):
    make_beir(tmp_path, corpus=corpus)
    with pytest.raises(DatasetFormatError, match=pattern):
        load_dataset(tmp_path)


@pytest.mark.parametrize("lines,pattern", [
    (["query-id corpus-id score", "q1\td1\t1"], r"test\.tsv:1: header must be"),
    (["query-id\tcorpus-id\tscore", "q1\td1"], r"test\.tsv:2: expected 3 tab-separated fields"),
    (["query-id\tcorpus-id\tscore", "q1\td1\thigh"], r"test\.tsv:2: field 'score' must be an integer"),
    (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q9\td1\t1"], r"test\.tsv:3: field 'query-id': query 'q9'"),
    (["query-id\tcorpus-id\tscore", "q1\td9\t1"], r"test\.tsv:2: field 'corpus-id': document 'd9'"),
    (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td1\t0"], r"test\.tsv:3: duplicate judgement"),
    (["query-id\tcorpus-id\tscore"], r"has no relevance judgements"),
])
def test_bad_beir_qrels(tmp_path, lines, pattern):
    make_beir(tmp_path, qrels_lines=lines)
    with pytest.raises(DatasetFormatError, match=pattern):
        load_dataset(tmp_path)


def test_bad_custom_files(tmp_path):
    make_custom(tmp_path / "a", qrels=[{"qid": "q1", "docid": "d1", "relevance": "x"}])
    with pytest.raises(DatasetFormatError, match=r"test_qrels\.jsonl:1: field 'relevance' must be an integer"):
        load_dataset(tmp_path / "a")
    make_custom(tmp_path / "b", qrels=[{"qid": "q1", "relevance": 1}])
    with pytest.raises(DatasetFormatError, match=r"test_qrels\.jsonl:1: field 'docid' is missing"):
        load_dataset(tmp_path / "b")
    make_custom(tmp_path / "c", corpus=[{"_id": "d1", "text": "x"}])
    with pytest.raises(DatasetFormatError, match=r"corpus\.jsonl:1: field 'id' is missing"):
        load_dataset(tmp_path / "c")
    ok = load_dataset(make_custom(tmp_path / "d", qrels=[{"qid": "q1", "docid": "d1", "relevance": "2"}]))
    assert ok.qrels == {"q1": {"d1": 2}}


# ---------------------------------------------------------------------- man pages
def fake_pages(n):
    return [ManPage(f"page{i}.3", f"does thing {i}", f"The page {i} describes thing {i} in detail.")
            for i in range(n)]


def test_manpages_beir_split(tmp_path):
    pages = fake_pages(50)
    a = build_manpages_beir(tmp_path / "a", seed=1, test_fraction=0.2, pages=pages)
    b = build_manpages_beir(tmp_path / "b", seed=1, test_fraction=0.2, pages=pages)
    c = build_manpages_beir(tmp_path / "c", seed=2, test_fraction=0.2, pages=pages)
    test, train = load_dataset(a, "test"), load_dataset(a, "train")
    assert len(test.queries) == 10 and len(train.queries) == 40
    assert not set(test.queries) & set(train.queries)
    assert len(test.corpus) == 50  # every page is a document for both splits
    assert all(test.qrels[q] == {q[2:]: 1} for q in test.qrels)
    assert test.queries["q:page7.3"] == "does thing 7" if "q:page7.3" in test.queries else True
    assert load_dataset(b, "test").qrels == test.qrels
    assert load_dataset(c, "test").qrels != test.qrels
    with pytest.raises(ValueError, match="test_fraction"):
        build_manpages_beir(tmp_path / "x", test_fraction=1.0, pages=pages)


def test_manpages_dev_split_keeps_the_test_pages(tmp_path):
    pages = fake_pages(50)
    plain = build_manpages_beir(tmp_path / "plain", seed=3, test_fraction=0.2, pages=pages)
    with_dev = build_manpages_beir(tmp_path / "dev", seed=3, test_fraction=0.2, pages=pages, dev_fraction=0.1)
    assert not os.path.exists(os.path.join(plain, "qrels", "dev.tsv"))
    test, dev, train = (load_dataset(with_dev, s) for s in ("test", "dev", "train"))
    assert test.qrels == load_dataset(plain, "test").qrels  # earlier test numbers stay comparable
    assert len(dev.queries) == 5 and len(train.queries) == 35
    assert not set(dev.queries) & (set(test.queries) | set(train.queries))
    assert set(dev.queries) | set(train.queries) == set(load_dataset(plain, "train").queries)
    other = build_manpages_beir(tmp_path / "other", seed=4, test_fraction=0.2, pages=pages, dev_fraction=0.1)
    assert load_dataset(other, "dev").qrels != dev.qrels  # seeded
    with pytest.raises(ValueError, match="dev_fraction"):
        build_manpages_beir(tmp_path / "x", test_fraction=0.5, dev_fraction=0.5, pages=pages)


# ---------------------------------------------------------------------- runner
@pytest.fixture(scope="module")
def manpage_set(tmp_path_factory):
    from trine.datasets.manpages import load_manpages

    try:
        pages = load_manpages(update_package_lists=True)
    except RuntimeError as err:
        unavailable(f"man pages unavailable: {err}")
    return load_dataset(build_manpages_beir(tmp_path_factory.mktemp("mp") / "mp", limit=200, pages=pages), "test")


def test_runner_all_modes_on_real_data(tmp_path, manpage_set, splade_tiny_dir):
    from trine import M3Embedder

    model = M3Embedder(splade_tiny_dir, init_missing_heads="neutral", show_progress=False, devices="cpu")
    config = EvalConfig(modes=("dense", "sparse", "colbert", "dense+sparse", "all", "rrf"), k_values=(1, 10, 50),
                        top_k=50, rerank_k=50, passage_max_length=256)
    result = run_evaluation([model, model], manpage_set, config, return_runs=True)
    assert list(result["models"]) == ["M3Embedder#1", "M3Embedder#2"]
    metrics = result["models"]["M3Embedder#1"]["metrics"]
    # the old eval names are aliases of FlagEmbedding's mode names, which the results use
    assert list(metrics) == ["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense", "rrf"]
    assert list(config.modes) == list(metrics)
    assert metrics == result["models"]["M3Embedder#2"]["metrics"]
    for values in metrics.values():
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert values["recall@1"] <= values["recall@10"] <= values["recall@50"]
    # lexical matching of a NAME line against its DESCRIPTION works even with untrained neutral heads
    assert metrics["sparse"]["recall@10"] > 0.5
    best_single = max(metrics["dense"]["recall@50"], metrics["sparse"]["recall@50"])
    assert metrics["colbert+sparse+dense"]["recall@50"] >= best_single - 1e-9

    # The dense run against a brute-force search made here. Man pages that share a DESCRIPTION have
    # identical vectors, so exact ties are common and FAISS and numpy may order (and cut) them
    # differently: compare scores, not positions. Every returned score is the brute-force score of
    # that document, and the run is a top-50: nothing left out scores above the last one kept.
    ids, texts = manpage_set.passages()
    qids = list(manpage_set.queries)
    d = model.encode(texts, max_length=256)["dense_vecs"]
    q = model.encode([manpage_set.queries[x] for x in qids], max_length=64)["dense_vecs"]
    sims = q @ d.T
    col = {doc: j for j, doc in enumerate(ids)}
    dense_run = result["models"]["M3Embedder#1"]["runs"]["dense"]
    for i, qid in enumerate(qids):
        got = dense_run[qid]
        assert len(got) == 50
        ref = np.array([sims[i, col[doc]] for doc in got])
        np.testing.assert_allclose(np.array(list(got.values())), ref, atol=1e-5)
        left_out = np.delete(sims[i], [col[doc] for doc in got])
        assert left_out.max() <= ref.min() + 1e-5
    # ... and the metric is pytrec_eval's own on that run (trec_eval breaks ties by document id).
    ref = pytrec_eval.RelevanceEvaluator(manpage_set.qrels, {"ndcg_cut.10"}).evaluate(dense_run)
    assert metrics["dense"]["ndcg@10"] == pytest.approx(np.mean([ref[x]["ndcg_cut_10"] for x in qids]), abs=1e-12)

    paths = write_report(result, tmp_path / "report")
    with open(paths["json"]) as f:
        assert json.load(f)["models"]["M3Embedder#1"]["metrics"] == metrics
    md = open(paths["markdown"]).read()
    assert "| M3Embedder#1 | colbert+sparse+dense |" in md and "ndcg@10" in md
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "sparse+dense" in text_table(result)
    with pytest.raises(ValueError, match="were not computed"):
        write_report(result, tmp_path / "r2", metrics=["ndcg@1000"])
    assert not (tmp_path / "r2").exists()


def test_model_labels():
    from trine.evaluation.runner import model_labels

    assert model_labels(["/a/x/model", "/b/y/model", "/c/bge-m3"]) == ["x/model", "y/model", "bge-m3"]
    assert model_labels(["/a/m", "/a/m"]) == ["m", "m#2"]
    assert model_labels(["/a/m"]) == ["m"]


def test_eval_config_errors():
    with pytest.raises(ValueError, match="unknown modes"):
        EvalConfig(modes=("dense", "splade"))
    with pytest.raises(ValueError, match="top_k"):
        EvalConfig(k_values=(10, 1000), top_k=100)
    with pytest.raises(ValueError, match="colbert_search"):
        EvalConfig(colbert_search="approx")
    with pytest.raises(ValueError, match="weights_all"):
        EvalConfig(weights_all=(1.0, 1.0))
    with pytest.raises(TypeError):
        EvalConfig(topk=10)


def test_cli_eval(tmp_path, splade_tiny_dir, capsys):
    from trine.cli import main

    data = tmp_path / "data"
    build_manpages_beir(data, pages=fake_pages(60), seed=0)
    out = tmp_path / "out"
    rc = main(["eval", "--data", str(data), "--model", splade_tiny_dir, "--heads", "neutral", "--quiet",
               "--modes", "dense,sparse,all", "--k", "1,10", "--top-k", "20", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sparse" in printed and "ndcg@10" in printed
    assert sorted(os.listdir(out)) == [MARKER, "modes.png", "results.json", "results.md"]
    assert main(["eval", "--data", str(data), "--k", "1,x"]) == 2  # a bad option: one line, exit 2
    assert "--k: expected comma-separated integers" in capsys.readouterr().err


def test_cli_eval_in_bfloat16(tmp_path, splade_tiny_dir, capsys, monkeypatch):
    """--bf16 loads the evaluated models in bfloat16 (the encoder's dtype) and gives nearly the float32 numbers;
    --fp16 with --bf16 is one line, exit 2."""
    import json

    import torch

    from trine.cli import main
    from trine.inference.encoder import Encoder

    data = tmp_path / "data"
    build_manpages_beir(data, pages=fake_pages(60), seed=0)
    dtypes = []
    original = Encoder.encode_result
    monkeypatch.setattr(Encoder, "encode_result", lambda self, *a, **k: dtypes.append(self.dtype) or
                        original(self, *a, **k))
    results = {}
    for name, flags in (("fp32", []), ("bf16", ["--bf16"])):
        out = tmp_path / name
        assert main(["eval", "--data", str(data), "--model", splade_tiny_dir, "--heads", "neutral", "--quiet",
                     "--modes", "dense,sparse,colbert", "--k", "10", "--out", str(out), *flags]) == 0
        (entry,) = json.loads((out / "results.json").read_text())["models"].values()
        results[name] = entry["metrics"]
    assert set(dtypes) == {torch.float32, torch.bfloat16}
    for mode, metrics in results["fp32"].items():
        assert abs(results["bf16"][mode]["ndcg@10"] - metrics["ndcg@10"]) < 0.05, mode
    capsys.readouterr()
    assert main(["eval", "--data", str(data), "--model", splade_tiny_dir, "--fp16", "--bf16"]) == 2
    assert "exclusive" in capsys.readouterr().err


def test_cli_manpages_data(tmp_path, manpage_set, capsys):
    from trine.cli import main

    assert main(["manpages-data", str(tmp_path / "mp"), "--limit", "40", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mp")
    test = load_dataset(tmp_path / "mp", "test")
    assert len(test.corpus) == 40 and len(test.queries) == 8
    q = next(iter(test.queries))
    doc = next(iter(test.qrels[q]))
    assert q == "q:" + doc and test.corpus[doc]["text"]
    assert main(["manpages-data", str(tmp_path / "mp2"), "--limit", "40", "--seed", "3", "--dev-fraction", "0.25"]) == 0
    capsys.readouterr()
    assert load_dataset(tmp_path / "mp2", "test").qrels == test.qrels
    assert len(load_dataset(tmp_path / "mp2", "dev").queries) == 10
    assert main(["manpages-data", str(tmp_path / "mp3"), "--dev-fraction", "0.9"]) == 2
    assert "--dev-fraction" in capsys.readouterr().err and not (tmp_path / "mp3").exists()
