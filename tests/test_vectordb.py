"""Vector-database backends (Milvus Lite, Qdrant local mode) against trine's exact indexes, on real man-page
passages and their NAME lines as queries, encoded by a tiny BGE-M3-shaped model: the same top-10, the same
exact scores, the same fusion; updates, resumed builds, refusals; `trine index`, `trine eval --backend`,
`trine mine --backend`."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from conftest import require, unavailable

from trine import M3Embedder
from trine.cli import main
from trine.retrieval import HybridRetriever, QueryReps, reciprocal_rank_fusion
from trine.retrieval.vectordb import (
    BackendUnreachableError,
    CollectionMismatchError,
    ModelSignature,
    collection_class,
    signature_of,
)
from trine.retrieval.vectordb import (
    require as require_backend,
)

BACKENDS = ["milvus", "qdrant"]
N_PASSAGES = 300
N_QUERIES = 40


def make_m3(out_dir, base_dir, colbert_dim, seed=0):
    """A trained small BERT (splade-tiny, 128 hidden: its dense vectors rank text by meaning, unlike a random
    backbone's) with seeded random BGE-M3 heads saved beside it: every load gives the same model."""
    import shutil

    import torch

    shutil.copytree(base_dir, out_dir)
    torch.manual_seed(seed)
    sparse = torch.nn.Linear(128, 1)
    torch.nn.init.normal_(sparse.weight, std=0.05)  # weights near 1 (the neutral start), varied by the token
    torch.nn.init.constant_(sparse.bias, 1.0)
    torch.save(torch.nn.Linear(128, colbert_dim).state_dict(), f"{out_dir}/colbert_linear.pt")
    torch.save(sparse.state_dict(), f"{out_dir}/sparse_linear.pt")
    return str(out_dir)


@pytest.fixture(scope="module")
def m3_dir(tmp_path_factory, splade_tiny_dir):
    return make_m3(tmp_path_factory.mktemp("m3") / "model", splade_tiny_dir, 64)


@pytest.fixture(scope="module")
def pages():
    """Man pages with distinct DESCRIPTIONs (pages sharing one would tie exactly: any order is right)."""
    from trine.datasets.manpages import load_manpages

    try:
        pages = load_manpages(update_package_lists=True)
    except RuntimeError as err:
        unavailable(f"man pages unavailable: {err}")
    unique = list({p.description[:1500]: p for p in reversed(pages)}.values())[::-1]
    rng = np.random.default_rng(0)
    return [unique[i] for i in sorted(rng.choice(len(unique), N_PASSAGES, replace=False))]


@pytest.fixture(scope="module")
def embedder(m3_dir):
    return M3Embedder(m3_dir, show_progress=False, passage_max_length=96, query_max_length=32)


@pytest.fixture(scope="module")
def encoded(pages, embedder):
    """(doc ids, texts, docs, queries): every representation of the passages and of NAME-line queries."""
    texts = [p.description[:1500] for p in pages]
    ids = [p.page for p in pages]
    docs = dict(embedder.encode_result(texts, ("dense", "sparse", "colbert"), kind="passage"))
    queries = dict(embedder.encode_result([p.name for p in pages[:N_QUERIES]], ("dense", "sparse", "colbert"),
                                          kind="query"))
    return ids, texts, docs, queries


def connection(backend, tmp_path, persistent=False):
    if backend == "milvus":
        require("pymilvus")
        return {"uri": str(tmp_path / "milvus.db")}
    require("qdrant_client")
    return {"path": str(tmp_path / "qdrant")} if persistent else {"location": ":memory:"}


def make(backend, tmp_path, docs, ids, texts=None, persistent=False, name="docs", **options):
    present = {k: v for k, v in docs.items() if v is not None}
    reps = tuple(r for r, k in (("dense", "dense_vecs"), ("sparse", "lexical_weights"), ("colbert", "colbert_vecs"))
                 if k in present)
    coll = collection_class(backend).create(name, representations=reps, signature=signature_of(present),
                                            **connection(backend, tmp_path, persistent), **options)
    coll.add(present, ids, texts)
    return coll


def assert_same_ranking(index, queries, got, want, atol):
    """``got`` ranks as ``want`` (trine's exact top-k): the same score at every rank, and trine's own exact
    score of each row ``got`` returns is that score (rows may differ only among tied scores)."""
    np.testing.assert_allclose(got.scores, want.scores, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(index.score(queries, got.rows), want.scores, atol=atol, rtol=1e-5)
    assert (got.rows == want.rows).mean() > 0.97  # ties aside, the very same rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_mode_equals_trine(backend, tmp_path, encoded):
    ids, texts, docs, queries = encoded
    coll = make(backend, tmp_path, docs, ids, texts)
    ref = HybridRetriever.from_encoded(docs, ids)
    db = coll.retriever()
    reps = QueryReps.from_encode(queries)
    assert list(db.ids) == ids
    for mode, q, atol in (("dense", reps.dense_vecs, 1e-5), ("sparse", reps.lexical_weights, 1e-4)):
        want = ref.first_stage(reps, mode, 10)
        assert np.isfinite(want.scores).mean() > 0.9  # nearly every query has ten lexical matches
        assert_same_ranking(ref.indexes[mode], q, db.first_stage(reps, mode, 10), want, atol)
    # exact scores of arbitrary rows: the stored vectors give trine's numbers
    rows = np.random.default_rng(1).integers(-1, len(ids), size=(N_QUERIES, 30))
    for mode, q in (("dense", reps.dense_vecs), ("sparse", reps.lexical_weights), ("colbert", reps.colbert_vecs)):
        np.testing.assert_allclose(db.indexes[mode].score(q, rows), ref.indexes[mode].score(q, rows), atol=1e-5,
                                   rtol=1e-5)
    # ColBERT: Qdrant's own MAX_SIM search (scaled to trine's mean) / Milvus's token-candidate search, then the
    # re-ranking of dense candidates that trine eval runs
    few = QueryReps(colbert_vecs=reps.colbert_vecs[:10])  # Milvus: a token search and a fetch per query
    got = db.first_stage(few, "colbert", 10)
    np.testing.assert_allclose(ref.indexes["colbert"].score(few.colbert_vecs, got.rows), got.scores, atol=1e-5)
    if backend == "qdrant":
        got = db.first_stage(reps, "colbert", 10)
        assert_same_ranking(ref.indexes["colbert"], reps.colbert_vecs, got, ref.first_stage(reps, "colbert", 10),
                            1e-5)
    assert_same_ranking(ref.indexes["colbert"], reps.colbert_vecs, db.search_mode(reps, "colbert", 10),
                        ref.search_mode(reps, "colbert", 10), 1e-5)
    # hybrid fusion: HybridRetriever over the collection ranks as over trine's indexes, same weights
    for weights in ({"dense": 1.0, "sparse": 0.3}, {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}):
        want = ref.search(reps, 10, weights, candidate_k=50)
        got = db.search(reps, 10, weights, candidate_k=50)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        assert (got.rows == want.rows).mean() > 0.97
    # the engine's own RRF: trine's reciprocal_rank_fusion numbers over the same two lists
    lists = [ref.first_stage(reps, m, 50) for m in ("dense", "sparse")]
    want = reciprocal_rank_fusion(lists, 100, 60.0)
    got = coll.engine_search(queries, 10, {"dense": 1, "sparse": 1}, fusion="rrf", candidate_k=50, rrf_k=60)
    np.testing.assert_allclose(got.scores, want.scores[:, :10], rtol=1e-6)
    for i in range(N_QUERIES):  # each returned row has the RRF score trine gives it (ties may swap rows)
        fused = dict(zip(want.rows[i].tolist(), want.scores[i].tolist()))
        np.testing.assert_allclose([fused[r] for r in got.rows[i]], got.scores[i], rtol=1e-6)
    coll.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hnsw_recall_against_exact(backend, tmp_path, encoded):
    ids, _, docs, queries = encoded
    dense = {"dense_vecs": docs["dense_vecs"]}
    coll = make(backend, tmp_path, dense, ids, dense_index="hnsw", hnsw_m=16, ef_construction=100, ef_search=64)
    ref = HybridRetriever.from_encoded(dense, ids)
    q = np.concatenate([queries["dense_vecs"], docs["dense_vecs"][::2] + 0.01])
    got = coll.search("dense", q, 10).rows
    want = ref.first_stage(QueryReps(q), "dense", 10).rows
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= 0.99, recall
    coll.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_deletes_and_reopening(backend, tmp_path, encoded):
    ids, texts, docs, _ = encoded
    n = 60
    part = {k: v[:n] for k, v in docs.items()}
    coll = make(backend, tmp_path, {k: v[:40] for k, v in part.items()}, ids[:40], texts[:40], persistent=True)
    with pytest.raises(ValueError, match="unique"):
        coll.add({k: v[30:45] for k, v in part.items()}, ids[30:45])  # add refuses stored ids
    # upsert: ids 30..59, of which 30..39 stored; those get other vectors (the ones of 0..9) and keep their rows
    new = {k: v[:10] + v[40:60] if isinstance(v, list) else np.concatenate([v[:10], v[40:60]]) for k, v in part.items()}
    coll.upsert(new, ids[30:60], batch_size=7)
    assert coll.ids == ids[:60]
    np.testing.assert_allclose(np.stack(coll.fetch("dense", ids[30:32])), part["dense_vecs"][:2], atol=1e-7)
    assert coll.fetch("sparse", [ids[31]])[0] == pytest.approx(part["lexical_weights"][1], rel=1e-6)
    np.testing.assert_allclose(coll.fetch("colbert", [ids[35]])[0], part["colbert_vecs"][5], atol=1e-7)
    coll.delete([ids[0], ids[10]])
    assert coll.ids == ids[1:10] + ids[11:60]
    with pytest.raises(KeyError):
        coll.delete(["no such page"])
    where = coll.connection()
    coll.close()
    again = collection_class(backend).open("docs", **where)  # what is stored, in row order, no duplicates
    assert again.ids == ids[1:10] + ids[11:60] and len(set(again.ids)) == len(again.ids)
    # the searched rows of a reopened collection are the rows of its ids
    q = docs["dense_vecs"][20:23]
    res = again.search("dense", q, 1)
    assert [again.ids[r] for r in res.rows[:, 0]] == ids[20:23]
    # saved as a HybridRetriever (index.json naming the backend and the collection), loaded back
    again.retriever().save(tmp_path / "saved")
    again.close()
    loaded = HybridRetriever.load(tmp_path / "saved")
    assert list(loaded.ids) == ids[1:10] + ids[11:60]
    assert loaded.first_stage(QueryReps(q), "dense", 1).rows[:, 0].tolist() == [18, 19, 20]  # 2 rows deleted before
    loaded.indexes["dense"].collection.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_models_collection_is_refused(backend, tmp_path, encoded, embedder):
    ids, _, docs, queries = encoded
    sig = signature_of(docs, embedder.tokenizer, "tiny")
    assert sig.vocab_size == len(embedder.tokenizer.get_vocab())
    coll = collection_class(backend).create("docs", representations=("dense", "sparse", "colbert"), signature=sig,
                                            **connection(backend, tmp_path, persistent=True))
    coll.add({k: v[:20] for k, v in docs.items()}, ids[:20])
    other = ModelSignature(dense_dim=sig.dense_dim * 2, colbert_dim=sig.colbert_dim, vocab_size=250002,
                           vocab_fingerprint="0" * 16)
    with pytest.raises(CollectionMismatchError, match=r"made by another model.*dense vectors of size 128, the model "
                       r"gives 256.*vocabulary of 30522 tokens, the model gives 250002.*fingerprint"):
        coll.check_model(other)
    coll.check_model(ModelSignature.of_encoder(embedder, ("dense", "sparse", "colbert")))  # its own model: fine
    with pytest.raises(CollectionMismatchError, match="dense vectors of size 128"):
        coll.search("dense", np.zeros((1, 64), np.float32), 5)
    with pytest.raises(CollectionMismatchError, match="dense vectors of size 128"):
        coll.add({**{k: v[20:21] for k, v in docs.items()}, "dense_vecs": np.ones((1, 64), np.float32)}, ["x"])
    with pytest.raises(CollectionMismatchError, match="outside this collection's vocabulary"):
        coll.search("sparse", [{"30522": 0.5}], 5)
    where = coll.connection()
    coll.close()
    with pytest.raises(CollectionMismatchError, match="holds dense, sparse, colbert, not dense"):
        collection_class(backend).create("docs", representations=("dense",), signature=sig, exist_ok=True, **where)
    with pytest.raises(CollectionMismatchError, match="made by another model"):
        collection_class(backend).create("docs", representations=("dense", "sparse", "colbert"), signature=other,
                                         exist_ok=True, **where)


def test_unreachable_server_fails_with_a_clear_error():
    require("pymilvus")
    require("qdrant_client")
    with pytest.raises(BackendUnreachableError, match=r"milvus: cannot reach http://127.0.0.1:9"):
        collection_class("milvus").open("docs", uri="http://127.0.0.1:9", timeout=2)
    with pytest.raises(BackendUnreachableError, match=r"qdrant: cannot reach http://127.0.0.1:9"):
        collection_class("qdrant").open("docs", url="http://127.0.0.1:9", timeout=2)
    assert main(["index", "search", "--backend", "qdrant", "--uri", "http://127.0.0.1:9", "--model", "x",
                 "--query", "q"]) == 2  # a user's error (exit 2), not a traceback


def test_missing_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install trine\[vectordb\]"):
        require_backend("pymilvus", "milvus")


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def beir(pages, tmp_path_factory):
    from trine.datasets.manpages import ManPage
    from trine.evaluation import build_manpages_beir

    short = [ManPage(p.page, p.name, p.description[:1500]) for p in pages[:150]]
    return build_manpages_beir(tmp_path_factory.mktemp("mp") / "mp", pages=short, seed=0, test_fraction=0.3)


def test_cli_build_resumes_after_a_kill_and_searches_as_trine(tmp_path, beir, m3_dir, capsys, monkeypatch):
    from trine.retrieval.milvus import MilvusCollection

    corpus = f"{beir}/corpus.jsonl"
    uri = str(tmp_path / "m.db")
    build = ["index", "build", "--backend", "milvus", "--model", m3_dir, "--corpus", corpus, "--uri", uri,
             "--passage_max_len", "128", "--chunk-size", "40", "--upsert-batch", "16", "--quiet"]
    real = MilvusCollection._engine_upsert
    calls = []

    def killed(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the build is killed in its second chunk
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MilvusCollection, "_engine_upsert", killed)
    with pytest.raises(KeyboardInterrupt):
        main(build)
    monkeypatch.setattr(MilvusCollection, "_engine_upsert", real)
    capsys.readouterr()
    assert main(build) == 0
    err = capsys.readouterr().err
    assert "56 passages stored, 94 to encode of 150" in err  # chunk 1 (16 + 16 + 8) and one batch of chunk 2
    assert main(build) == 0  # again: nothing to do, nothing duplicated
    assert "150 passages stored, 0 to encode" in capsys.readouterr().err
    coll = MilvusCollection.open("trine", uri=uri)
    ids = [json.loads(line)["_id"] for line in open(corpus)]
    assert coll.ids == ids
    coll.close()
    trine_dir = str(tmp_path / "trine_index")
    assert main(["index", "build", "--backend", "trine", "--model", m3_dir, "--corpus", corpus, "--uri",
                 trine_dir, "--passage_max_len", "128", "--quiet"]) == 0
    capsys.readouterr()
    outs = {}
    for backend, where in (("trine", trine_dir), ("milvus", uri)):
        assert main(["index", "search", "--backend", backend, "--uri", where, "--model", m3_dir,
                     "--queries", f"{beir}/queries.jsonl", "--mode", "sparse+dense", "--k", "5", "--quiet"]) == 0
        outs[backend] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(outs["trine"]) == 150
    for a, b in zip(outs["trine"], outs["milvus"]):
        assert [h["score"] for h in a["hits"]] == pytest.approx([h["score"] for h in b["hits"]], abs=1e-4)
    # the engine's RRF is plain reciprocal rank fusion (every list weight 1) without --weights; Milvus's RRF
    # ranker takes no weights (an error, not a silent change)
    rrf = {}
    for weights in ([], ["--weights", "1,1"], ["--weights", "1,0.3"]):
        rc = main(["index", "search", "--backend", "milvus", "--uri", uri, "--model", m3_dir, "--queries",
                   f"{beir}/queries.jsonl", "--mode", "sparse+dense", "--k", "5", "--engine-fusion", "rrf",
                   *weights, "--quiet"])
        out, err = capsys.readouterr()
        rrf[",".join(weights[1:])] = (rc, [json.loads(line)["hits"] for line in out.splitlines()], err)
    assert rrf[""][0] == rrf["1,1"][0] == 0 and rrf[""][1] == rrf["1,1"][1]
    assert rrf["1,0.3"][0] == 2 and "the RRF ranker takes no weights" in rrf["1,0.3"][2]
    # unweighted RRF scores: 1 / (60 + rank) summed over the lists (of 100) a passage is in
    sums = {1 / (60 + a) + (1 / (60 + b) if b else 0) for a in range(1, 101) for b in range(101)}
    for hits in rrf[""][1]:
        assert all(min(abs(h["score"] - v) for v in sums) < 2e-6 for h in hits)
    assert main(["index", "delete", "--backend", "milvus", "--uri", uri, "--ids", f"{ids[0]},{ids[1]}"]) == 0
    assert "holds 148 passages" in capsys.readouterr().out


def test_cli_refuses_a_collection_of_another_model(tmp_path, beir, m3_dir, splade_tiny_dir, capsys):
    other = make_m3(tmp_path / "other", splade_tiny_dir, 16, seed=1)
    uri = str(tmp_path / "q")
    assert main(["index", "build", "--backend", "qdrant", "--model", m3_dir, "--corpus", f"{beir}/corpus.jsonl",
                 "--uri", uri, "--passage_max_len", "64", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "search", "--backend", "qdrant", "--uri", uri, "--model", other, "--query", "x",
                 "--mode", "colbert", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "made by another model" in err and "ColBERT vectors of size 64, the model gives 16" in err


def home_and_cwd(tmp_path, monkeypatch):
    """A home folder (where trine's cache is) and a working folder of their own, both empty."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd


def test_cli_eval_backend_gives_trine_metrics(tmp_path, beir, m3_dir, capsys, monkeypatch):
    home, cwd = home_and_cwd(tmp_path, monkeypatch)
    results = {}
    for name in ("trine", *BACKENDS):
        # milvus without --uri: a Milvus Lite file in trine's cache, named by the collection (model and corpus)
        uri = [] if name in ("trine", "milvus") else ["--uri", str(tmp_path / "q")]
        assert main(["eval", "--data", beir, "--model", m3_dir, "--modes", "dense,sparse,colbert,sparse+dense",
                     "--passage_max_len", "128", "--k", "1,10", "--backend", name, *uri, "--quiet",
                     "--out", str(tmp_path / f"out_{name}")]) == 0
        with open(tmp_path / f"out_{name}" / "results.json") as f:
            results[name] = next(iter(json.load(f)["models"].values()))["metrics"]
    capsys.readouterr()
    assert os.listdir(cwd) == []  # nothing in the working folder
    made = os.listdir(home / ".cache" / "trine" / "vectordb")
    assert len(made) == 1 and made[0].startswith("trine_eval_")
    assert os.listdir(home / ".cache" / "trine" / "vectordb" / made[0]) == ["milvus.db"]
    for backend in BACKENDS:
        assert results["trine"].keys() == results[backend].keys()
        for mode, metrics in results["trine"].items():
            assert metrics == pytest.approx(results[backend][mode], abs=1e-9), (backend, mode)


def test_cli_mine_backend_mines_as_trine(tmp_path, pages, m3_dir, monkeypatch):
    home, cwd = home_and_cwd(tmp_path, monkeypatch)
    train = tmp_path / "train.jsonl"
    with open(train, "w") as f:
        for p in pages[:60]:
            f.write(json.dumps({"query": p.name, "pos": [p.description[:600]], "neg": []}) + "\n")
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for p in pages[:200]:
            f.write(json.dumps({"text": p.description[:600]}) + "\n")
    outs = {}
    for backend in ("trine", "qdrant"):
        out = tmp_path / f"mined_{backend}.jsonl"
        extra = [] if backend == "trine" else ["--backend", backend]  # no --uri: trine's cache
        assert main(["mine", "--input_file", str(train), "--output_file", str(out), "--model_name_or_path",
                     m3_dir, "--candidate_pool", str(pool), "--hybrid_weights", "1,0.3", "--range_for_sampling",
                     "2-30", "--negative_number", "5", "--passage_max_len", "128", "--quiet", *extra]) == 0
        outs[backend] = [json.loads(line)["neg"] for line in open(out)]
    assert outs["trine"] == outs["qdrant"]
    assert os.listdir(cwd) == []  # not trine_qdrant/ in the working folder
    made = os.listdir(home / ".cache" / "trine" / "vectordb")
    assert len(made) == 1 and made[0].startswith("trine_pool_")
    assert os.listdir(home / ".cache" / "trine" / "vectordb" / made[0]) == ["qdrant"]


# ------------------------------------------------------------------ building from `trine encode` shards
def _search_hits(backend, where, m3_dir, queries, mode, capsys):
    assert main(["index", "search", "--backend", backend, "--uri", where, "--model", m3_dir, "--queries", queries,
                 "--mode", mode, "--k", "10", "--quiet"]) == 0
    return [json.loads(line)["hits"] for line in capsys.readouterr().out.splitlines()]


def test_cli_build_from_encodings_searches_as_a_build_that_encodes(tmp_path, beir, m3_dir, capsys, monkeypatch):
    """`trine index build --embeddings ENC` (shards of `trine encode`, nothing encoded) gives the hits and scores
    of a build that encodes the corpus itself; resumed after a kill without duplicates."""
    from trine.retrieval.milvus import MilvusCollection

    corpus, queries = f"{beir}/corpus.jsonl", str(tmp_path / "queries.jsonl")
    with open(f"{beir}/queries.jsonl") as src, open(queries, "w") as dst:
        dst.writelines(line for _, line in zip(range(N_QUERIES), src))
    enc = str(tmp_path / "enc")
    assert main(["encode", m3_dir, corpus, "--output-dir", enc, "--outputs", "dense,sparse,colbert",
                 "--num-shards", "3", "--passage_max_len", "128", "--no-progress"]) == 0
    trine_enc, trine_emb = str(tmp_path / "t_enc"), str(tmp_path / "t_emb")
    assert main(["index", "build", "--backend", "trine", "--model", m3_dir, "--corpus", corpus, "--uri", trine_enc,
                 "--passage_max_len", "128", "--quiet"]) == 0
    assert main(["index", "build", "--backend", "trine", "--model", m3_dir, "--corpus", corpus, "--uri", trine_emb,
                 "--embeddings", enc, "--quiet"]) == 0
    assert f"indexed 150 passages (dense, sparse, colbert) into {trine_emb} from the encodings" in \
        capsys.readouterr().out
    uri = str(tmp_path / "m.db")
    build = ["index", "build", "--backend", "milvus", "--model", m3_dir, "--corpus", corpus, "--uri", uri,
             "--embeddings", enc, "--outputs", "dense,sparse", "--chunk-size", "40", "--upsert-batch", "16",
             "--quiet"]
    real, calls = MilvusCollection._engine_upsert, []

    def killed(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed in the second shard
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MilvusCollection, "_engine_upsert", killed)
    with pytest.raises(KeyboardInterrupt):
        main(build)
    monkeypatch.setattr(MilvusCollection, "_engine_upsert", real)
    capsys.readouterr()
    assert main(build) == 0
    # shard 1 (50 rows: 40 + 10 = 16 + 16 + 8 + 10) and one batch of shard 2
    assert "66 passages stored, 84 to write from the encodings of 150" in capsys.readouterr().err
    assert main(build) == 0
    assert "150 passages stored, 0 to write" in capsys.readouterr().err
    coll = MilvusCollection.open("trine", uri=uri)
    assert coll.ids == [json.loads(line)["_id"] for line in open(corpus)]
    coll.close()
    for mode in ("sparse+dense", "colbert+sparse+dense"):  # the exact dense, lexical and maxsim scores
        want = _search_hits("trine", trine_enc, m3_dir, queries, mode, capsys)
        got = {"trine": _search_hits("trine", trine_emb, m3_dir, queries, mode, capsys)}
        if mode == "sparse+dense":  # the fusion of both representations the collection holds
            got["milvus"] = _search_hits("milvus", uri, m3_dir, queries, mode, capsys)
        assert len(want) == N_QUERIES and all(len(h) == 10 for h in want)
        for backend, hits in got.items():
            for a, b in zip(want, hits):
                assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-4), (backend, mode)
            same = np.mean([x["id"] == y["id"] for a, b in zip(want, hits) for x, y in zip(a, b)])
            assert same > 0.99, (backend, mode, same)  # ties aside, the very same passages


def test_cli_build_from_encodings_refuses_what_does_not_match(tmp_path, beir, m3_dir, splade_tiny_dir, capsys):
    """Nothing is written when the encodings are unfinished, lack an output, come from another model or another
    corpus, or were encoded with another passage length than the one asked; what matches goes into Qdrant."""
    import shutil

    corpus = f"{beir}/corpus.jsonl"
    enc = str(tmp_path / "enc")
    assert main(["encode", m3_dir, corpus, "--output-dir", enc, "--outputs", "dense,sparse", "--num-shards", "2",
                 "--passage_max_len", "64", "--no-progress"]) == 0
    other_model = make_m3(tmp_path / "other", splade_tiny_dir, 64, seed=1)
    edited = tmp_path / "edited.jsonl"
    lines = open(corpus).read().splitlines()
    record = json.loads(lines[7])
    record["text"] += " (edited)"
    edited.write_text("\n".join(lines[:7] + [json.dumps(record)] + lines[8:]) + "\n")
    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(enc, unfinished)
    os.remove(os.path.join(unfinished, "shard-00001-of-00002", "meta.json"))  # as a killed encode leaves it
    unhashed = str(tmp_path / "unhashed")  # a manifest that does not record which corpus was encoded
    shutil.copytree(enc, unhashed)
    with open(os.path.join(unhashed, "manifest.json")) as f:
        manifest = json.load(f)
    del manifest["identity"]["corpus"]
    from trine.inference.shards import _key

    manifest["key"] = _key(manifest["identity"])  # as a writer that recorded no corpus would have keyed it
    with open(os.path.join(unhashed, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    for shard in ("shard-00000-of-00002", "shard-00001-of-00002"):  # ... and its shards
        meta_file = os.path.join(unhashed, shard, "meta.json")
        with open(meta_file) as f:
            meta = json.load(f)
        with open(meta_file, "w") as f:
            json.dump({**meta, "key": manifest["key"]}, f)
    uri = str(tmp_path / "m.db")
    cases = [
        (["--embeddings", unfinished], "1 of 2 shard(s) not finished (shard-00001-of-00002)"),
        (["--embeddings", enc, "--outputs", "dense,colbert"], "encoded with outputs dense, sparse; no colbert"),
        (["--embeddings", enc, "--model", other_model], "encoded by another model or with other settings than "
                                                         f"the encoder given ({other_model}) (different: model)"),
        (["--embeddings", enc, "--corpus", str(edited)], f"{edited}: not the corpus {enc} was encoded from"),
        (["--embeddings", enc, "--passage_max_len", "128"], "was encoded with passages of up to 64 tokens"),
        (["--embeddings", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["--embeddings", unhashed], "identity.corpus.sha256: not recorded"),
    ]
    for backend, where in (("milvus", uri), ("trine", str(tmp_path / "t"))):
        for extra, message in cases if backend == "milvus" else cases[2:4]:  # the checks are shared
            args = ["index", "build", "--backend", backend, "--model", m3_dir, "--corpus", corpus, "--uri", where,
                    "--quiet"]
            for flag, value in zip(extra[::2], extra[1::2]):
                if flag in args:
                    args[args.index(flag) + 1] = value
                else:
                    args += [flag, value]
            assert main(args) == 2, (backend, extra)
            assert message in capsys.readouterr().err, (backend, extra)
            assert not os.path.exists(where), (backend, extra)  # nothing written
    # the same encodings, matching, into Qdrant: the folder's outputs (dense + sparse) without --outputs, stored as
    # the shards hold them
    from trine.inference import load_encoded

    where = str(tmp_path / "q")
    assert main(["index", "build", "--backend", "qdrant", "--model", m3_dir, "--corpus", corpus, "--uri", where,
                 "--embeddings", enc, "--quiet"]) == 0
    assert "holds 150 passages (dense, sparse)" in capsys.readouterr().out
    want = load_encoded(enc)
    coll = collection_class("qdrant").open("trine", path=where)
    assert coll.ids == want.ids and coll.representations == ("dense", "sparse")
    np.testing.assert_allclose(np.stack(coll.fetch("dense", want.ids[::7])), want.result.dense_vecs[::7], atol=1e-7)
    got = coll.fetch("sparse", want.ids[::7])
    for g, w in zip(got, want.result.lexical_weights[::7]):
        assert g == pytest.approx({k: v for k, v in w.items() if v > 0}, rel=1e-6)
    coll.close()


def test_cli_indexes_and_searches_a_dense_only_model(tmp_path, beir, splade_tiny_dir, capsys):
    """A folder without BGE-M3 heads (a plain encoder) indexes its dense output, and search gives what its
    Embedder ranks; a lexical output it does not have is a one-line error."""
    from trine import Embedder
    from trine.cli import main

    corpus, uri = f"{beir}/corpus.jsonl", str(tmp_path / "dense_only")
    assert main(["index", "build", "--backend", "trine", "--model", splade_tiny_dir, "--corpus", corpus,
                 "--uri", uri, "--outputs", "dense", "--passage_max_len", "128", "--quiet"]) == 0
    capsys.readouterr()
    query = "list directory contents"
    assert main(["index", "search", "--backend", "trine", "--uri", uri, "--model", splade_tiny_dir, "--query", query,
                 "--mode", "dense", "--k", "3", "--quiet"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()][0]["hits"]
    docs = [json.loads(line) for line in open(corpus)]
    model = Embedder(splade_tiny_dir, show_progress=False, passage_max_length=128)
    texts = [(d.get("title", "") + " " + d["text"]).strip() if d.get("title") else d["text"] for d in docs]
    scores = model.encode_corpus(texts) @ model.encode_queries([query])[0]
    assert [h["id"] for h in hits] == [docs[i]["_id"] for i in np.argsort(-scores, kind="stable")[:3]]
    assert main(["index", "build", "--backend", "trine", "--model", splade_tiny_dir, "--corpus", corpus,
                 "--uri", str(tmp_path / "x"), "--outputs", "dense,sparse", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--outputs dense,sparse" in err and len(err.splitlines()) == 1
