"""The plaid index through trine's doors: `trine index build --colbert-index plaid` from `trine encode`'s shards
(resumed after a kill), `trine index search`, `trine eval --colbert-index plaid` and `/search` in `trine serve`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import SERVE_DOC_IDS, SERVE_DOCS, require
from test_vectordb import beir, m3_dir, pages  # noqa: F401  (module fixtures: a tiny M3 model and man pages)

from trine import M3Embedder
from trine.cli import main
from trine.inference.shards import load_encoded
from trine.retrieval import ColbertPlaidIndex, HybridRetriever, QueryReps
from trine.retrieval.plaid import PlaidCodec, build_plaid

PLAID = ["--colbert-index", "plaid", "--ncentroids", "32", "--nbits", "2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, beir, m3_dir):  # noqa: F811
    """(corpus, encode folder, index folder): 3 shards encoded, then indexed with a plaid colbert part."""
    tmp = tmp_path_factory.mktemp("plaid_cli")
    corpus, enc, uri = f"{beir}/corpus.jsonl", str(tmp / "enc"), str(tmp / "index")
    assert main(["encode", m3_dir, corpus, "--output-dir", enc, "--outputs", "dense,colbert", "--num-shards", "3",
                 "--passage_max_len", "128", "--no-progress"]) == 0
    return corpus, enc, uri


def test_index_build_from_shards_resumes_to_a_fresh_build(built, m3_dir, capsys, monkeypatch):  # noqa: F811
    corpus, enc, uri = built
    build = ["index", "build", "--model", m3_dir, "--corpus", corpus, "--uri", uri, "--embeddings", enc, "--quiet",
             *PLAID]
    assert main([*build[:-2], "--nprobe", "0"]) == 2  # a bad option: refused before anything is written
    assert "nprobe must be a positive integer" in capsys.readouterr().err
    assert main(["index", "build", "--model", m3_dir, "--corpus", corpus, "--uri", uri, "--embeddings", enc,
                 "--nbits", "2"]) == 2
    assert "options of --colbert-index plaid" in capsys.readouterr().err
    assert main([*build, "--outputs", "dense"]) == 2
    assert "compresses the colbert output, which this build does not index (dense)" in capsys.readouterr().err
    real, calls = PlaidCodec.compress, []

    def killed(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while compressing the second shard
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PlaidCodec, "compress", killed)
    with pytest.raises(KeyboardInterrupt):
        main(build)
    work = os.path.join(os.path.dirname(uri), f".{os.path.basename(uri)}.plaid-build")
    assert sorted(os.listdir(work)) == ["codec", "lengths", "part-00000", "settings.json"] and not os.path.exists(uri)
    monkeypatch.setattr(PlaidCodec, "compress", real)
    assert main([*build[:-2], "--nbits", "4"]) == 2  # other options than the kept build: refused, kept as it is
    assert "other nbits" in capsys.readouterr().err and os.path.isdir(work)
    assert main(build) == 0
    assert "colbert as a plaid index, 18 bytes per token" in capsys.readouterr().out  # 2 + 64 dims x 2 bits / 8
    assert not os.path.exists(work)
    retriever = HybridRetriever.load(uri)
    got = retriever.multivector
    assert isinstance(got, ColbertPlaidIndex) and set(retriever.indexes) == {"dense", "colbert"}
    encoded = load_encoded(enc, ("colbert",))
    fresh = ColbertPlaidIndex.build(encoded.result.colbert_vecs, encoded.ids, ncentroids=32, nbits=2)
    assert got.ids == fresh.ids
    for name in ("codes", "packed", "offsets"):
        np.testing.assert_array_equal(getattr(got, name), getattr(fresh, name))


def test_index_build_pq_and_pooling_flags(built, m3_dir, capsys, tmp_path):  # noqa: F811
    """--pq-bytes and --pool-factor reach the index (saved in its settings) and give what a build with those
    options gives; bad values are exit 2 before anything is written."""
    corpus, enc, _ = built
    uri = str(tmp_path / "pq")
    build = ["index", "build", "--model", m3_dir, "--corpus", corpus, "--uri", uri, "--embeddings", enc, "--quiet",
             "--colbert-index", "plaid", "--ncentroids", "32"]
    for bad, message in ((["--pool-factor", "0"], "pool_factor must be a positive integer"),
                         (["--pq-bytes", "16", "--nbits", "2"], "two codings of the residual"),
                         (["--nbits", "2", "--opq"], "opq rotates the residual")):
        assert main([*build, *bad]) == 2
        assert message in capsys.readouterr().err and not os.path.exists(uri)
    assert main([*build[:-4], "--pool-factor", "2"]) == 2
    assert "--pool-factor: options of --colbert-index plaid" in capsys.readouterr().err
    assert main([*build, "--pq-bytes", "16", "--pool-factor", "2"]) == 0
    assert "18 bytes per token (pool factor 2: per pooled token)" in capsys.readouterr().out  # 2 + 16
    got = HybridRetriever.load(uri).multivector
    assert got.options["pq_bytes"] == 16 and got.options["pool_factor"] == 2 and got.options["nbits"] is None
    assert got.options["opq"] is True and got.codec.rotation is not None  # on by default with --pq-bytes
    encoded = load_encoded(enc, ("colbert",))
    fresh = ColbertPlaidIndex.build(encoded.result.colbert_vecs, encoded.ids, ncentroids=32, pq_bytes=16,
                                    pool_factor=2)
    assert got.ids == fresh.ids and got.options == fresh.options
    for name in ("codes", "packed", "offsets"):
        np.testing.assert_array_equal(getattr(got, name), getattr(fresh, name))
    assert got.offsets[-1] < sum(len(v) for v in encoded.result.colbert_vecs) * 0.6


def test_index_search_full_is_the_plaid_search(built, m3_dir, capsys):  # noqa: F811
    corpus, enc, uri = built
    if not os.path.exists(uri):
        assert main(["index", "build", "--model", m3_dir, "--corpus", corpus, "--uri", uri, "--embeddings", enc,
                     "--quiet", *PLAID]) == 0
    queries = ["copy files and directories", "list directory contents", "print lines that match patterns"]
    argv = ["index", "search", "--model", m3_dir, "--uri", uri, "--mode", "colbert", "--colbert-search", "full",
            "--k", "5", "--quiet"]
    capsys.readouterr()
    assert main([*argv, *sum((["--query", q] for q in queries), [])]) == 0
    hits = [json.loads(line)["hits"] for line in capsys.readouterr().out.splitlines()]
    index = HybridRetriever.load(uri).multivector
    reps = M3Embedder(m3_dir, show_progress=False, query_max_length=64).encode_result(queries, ("colbert",),
                                                                                       kind="query")
    want = index.search(reps.colbert_vecs, 5)
    assert [[h["id"] for h in q] for q in hits] == [[index.ids[r] for r in rows] for rows in want.rows.tolist()]
    np.testing.assert_allclose([[h["score"] for h in q] for q in hits], want.scores, atol=1e-5)


def test_eval_colbert_first_stage_through_plaid(beir, m3_dir, tmp_path, capsys):  # noqa: F811
    """`trine eval --colbert-index plaid --colbert-search full`: the colbert mode is the plaid index's own search,
    within a little of the exact full scan on the same encodings."""
    common = ["eval", "--model", m3_dir, "--data", beir, "--modes", "colbert", "--colbert-search", "full",
              "--k", "10", "--metrics", "ndcg", "--passage_max_len", "128", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "exact")]) == 0
    assert main([*common, "--out", str(tmp_path / "plaid"), "--colbert-index", "plaid", "--nbits", "4",
                 "--ncentroids", "32"]) == 0
    assert main([*common, "--out", str(tmp_path / "bad"), "--colbert-index", "plaid", "--nbits", "3"]) == 2
    assert "nbits must be one of (1, 2, 4)" in capsys.readouterr().err

    def ndcg(folder):
        with open(tmp_path / folder / "results.json") as f:
            return json.load(f)["models"]["model"]["metrics"]["colbert"]["ndcg@10"]

    exact, plaid = ndcg("exact"), ndcg("plaid")
    assert exact > 0.3 and abs(plaid - exact) < 0.03, (exact, plaid)


def test_serve_search_over_a_saved_plaid_index(serve_m3, tmp_path):
    require("uvicorn")
    httpx = require("httpx2")
    from test_serving import AUTH, KEY, Server

    from trine.serving import ServeSettings, create_app

    docs = serve_m3.encode_corpus(SERVE_DOCS, return_sparse=False, return_colbert_vecs=True)
    colbert = build_plaid([lambda: (SERVE_DOC_IDS, docs["colbert_vecs"])], ncentroids=8, nbits=2)
    HybridRetriever.from_encoded({"dense_vecs": docs["dense_vecs"]}, SERVE_DOC_IDS, colbert_index=colbert).save(
        tmp_path / "index")
    retriever = HybridRetriever.load(tmp_path / "index")
    assert isinstance(retriever.multivector, ColbertPlaidIndex)
    server = Server(create_app(serve_m3, None, retriever, ServeSettings(model_name="tiny-m3", api_key=KEY),
                               documents=SERVE_DOCS))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            query = "how to list files in a directory"
            r = http.post("/search", json={"query": query, "k": 4, "mode": "colbert", "colbert_search": "full"})
            assert r.status_code == 200, r.text
    finally:
        server.stop()
    reps = QueryReps.from_encode(serve_m3.encode_queries([query], return_colbert_vecs=True, return_sparse=False))
    want = retriever.multivector.search(reps.colbert_vecs, 4)
    hits = r.json()["results"]
    assert [h["id"] for h in hits] == [SERVE_DOC_IDS[i] for i in want.rows[0].tolist() if i >= 0]
    np.testing.assert_allclose([h["score"] for h in hits], want.scores[0][want.rows[0] >= 0], atol=1e-5)
