"""Retrieval: indexes equal brute force (random and real encodings), fusion, export, save/load, errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import unavailable

from trine import scoring
from trine.retrieval import (
    DenseIndex,
    HybridRetriever,
    MultiVectorIndex,
    QueryReps,
    SearchResult,
    SparseIndex,
    reciprocal_rank_fusion,
    to_csr_arrays,
    to_indices_values,
    to_token_strings,
    top_k,
    union_rows,
    weighted_fusion,
)


def random_lexical(rng: np.random.Generator, n: int, vocab: int = 300, max_terms: int = 30) -> list[dict[str, float]]:
    out = []
    for _ in range(n):
        terms = rng.choice(vocab, size=rng.integers(0, max_terms), replace=False)
        # float32-representable weights, as the model gives
        out.append({str(t): float(np.float32(w)) for t, w in zip(terms, rng.random(terms.size) + 0.01)})
    return out


def brute_force_top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k by score, ties to the lower row; independent of trine's top_k."""
    order = sorted(range(scores.size), key=lambda i: (-scores[i], i))[:k]
    return scores[order], np.array(order, dtype=np.int64)


# ---------------------------------------------------------------------- top-k
def test_top_k_matches_sort_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.integers(0, 5, size=rng.integers(1, 40)).astype(np.float64)
        k = int(rng.integers(1, 45))
        got_s, got_r = top_k(s, k)
        ref_s, ref_r = brute_force_top(s, k)
        np.testing.assert_array_equal(got_r, ref_r)
        np.testing.assert_array_equal(got_s, ref_s)
    with pytest.raises(ValueError, match="k must be"):
        top_k(np.ones(3), 0)


# ---------------------------------------------------------------------- sparse
def check_sparse_equals_brute_force(docs, queries, k):
    index = SparseIndex.build(docs)
    brute = scoring.lexical_scores(queries, docs)
    res = index.search(queries, k)
    for i in range(len(queries)):
        np.testing.assert_allclose(index.score_all(queries[i]), brute[i], rtol=1e-6, atol=0)
        pos = brute[i] > 0
        ref_s, ref_r = brute_force_top(np.where(pos, brute[i], -np.inf), min(k, int(pos.sum())))
        got_r = res.rows[i][res.rows[i] >= 0]
        np.testing.assert_allclose(res.scores[i][: got_r.size], ref_s, rtol=1e-6)
        # rows equal except where scores tie to rounding
        same = np.isclose(brute[i][got_r], brute[i][ref_r], rtol=1e-6)
        assert same.all()
        assert got_r.size == ref_r.size
    return index


def test_sparse_equals_brute_force_random():
    rng = np.random.default_rng(1)
    docs = random_lexical(rng, 400)
    queries = random_lexical(rng, 30, max_terms=8) + [{}, {"999999": 1.0}]
    index = check_sparse_equals_brute_force(docs, queries, k=10)
    res = index.search([{}, {"999999": 1.0}], 5)
    assert (res.rows == -1).all() and np.isneginf(res.scores).all()


def test_sparse_score_rows_and_errors():
    docs = [{"1": 0.5, "2": 1.0}, {"2": 2.0}, {"3": 1.0}]
    index = SparseIndex.build(docs, ids=["a", "b", "c"])
    got = index.score([{"2": 1.0}], np.array([[1, -1, 0]]))
    np.testing.assert_allclose(got, [[2.0, -np.inf, 1.0]])
    res = index.search([{"2": 1.0, "1": 2.0}], 3)
    assert [index.ids[r] for r in res.rows[0] if r >= 0] == ["a", "b"]
    np.testing.assert_allclose(res.scores[0][:2], [2.0, 2.0])  # tie: lower row first
    with pytest.raises(ValueError, match=r"lexical_weights\[1\].*'x'"):
        SparseIndex.build([{"a": 1.0}, {"x": -1.0}])
    with pytest.raises(ValueError, match="unique"):
        SparseIndex.build([{"a": 1.0}, {"b": 1.0}], ids=["d", "d"])
    with pytest.raises(TypeError, match=r"lexical_weights\[0\]"):
        SparseIndex.build([["a"]])


def test_sparse_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    docs = random_lexical(rng, 100)
    queries = random_lexical(rng, 10)
    index = SparseIndex.build(docs, ids=[f"d{i}" for i in range(100)])
    path = tmp_path / "sparse"
    index.save(path)
    with pytest.raises(ValueError, match="--overwrite"):
        index.save(path)
    index.save(path, overwrite=True)  # replaces the folder whole
    loaded = SparseIndex.load(path)
    assert loaded.ids == index.ids
    a, b = index.search(queries, 7), loaded.search(queries, 7)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert sorted(os.listdir(tmp_path)) == ["sparse"]  # no temp folders left
    with pytest.raises(ValueError, match="'kind'"):
        MultiVectorIndex.load(path)


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    index = SparseIndex.build([{"1": 1.0}])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "s")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- dense
def test_dense_flat_equals_brute_force_and_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    q = rng.standard_normal((20, 24)).astype(np.float32)
    index = DenseIndex.build(x, ids=[f"d{i}" for i in range(500)])
    res = index.search(q, 10)
    brute = q @ x.T
    for i in range(20):
        ref_s, ref_r = brute_force_top(brute[i], 10)
        np.testing.assert_array_equal(res.rows[i], ref_r)
        np.testing.assert_allclose(res.scores[i], ref_s, rtol=1e-5)
    np.testing.assert_allclose(index.score(q[:2], np.array([[3, -1], [7, 8]])),
                               [[brute[0, 3], -np.inf], [brute[1, 7], brute[1, 8]]], rtol=1e-5)
    index.save(tmp_path / "d")
    loaded = DenseIndex.load(tmp_path / "d")
    np.testing.assert_array_equal(loaded.search(q, 10).rows, res.rows)
    assert loaded.ids == index.ids
    with pytest.raises(ValueError, match="shape"):
        index.search(np.ones((2, 5), np.float32), 3)
    with pytest.raises(ValueError, match="kind must be"):
        DenseIndex(24, kind="lsh")
    with pytest.raises(TypeError):
        DenseIndex(24, hnsw_M=8)


@pytest.mark.parametrize("kind,options", [("hnsw", {"hnsw_m": 16}), ("ivf", {"nlist": 16, "nprobe": 16})])
def test_dense_approximate_kinds(tmp_path, kind, options):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    q = x[:50] + 0.01 * rng.standard_normal((50, 16)).astype(np.float32)
    index = DenseIndex.build(x, kind=kind, **options)
    exact = DenseIndex.build(x).search(q, 10)
    res = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.rows.tolist(), exact.rows.tolist())])
    assert recall > 0.9  # nprobe = nlist makes IVF exact; HNSW at these sizes is near exact
    np.testing.assert_allclose(index.score(q, res.rows), res.scores, rtol=1e-4, atol=1e-5)
    index.save(tmp_path / kind)
    loaded = DenseIndex.load(tmp_path / kind)
    assert loaded.kind == kind and loaded.options == index.options
    np.testing.assert_array_equal(loaded.search(q, 10).rows, res.rows)


# ---------------------------------------------------------------------- multi-vector
def random_multivectors(rng, n, dim=8, max_len=12):
    out = []
    for _ in range(n):
        v = rng.standard_normal((int(rng.integers(1, max_len)), dim)).astype(np.float32)
        out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return out


def test_multivector_equals_brute_force_and_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    docs = random_multivectors(rng, 120)
    queries = random_multivectors(rng, 9)
    index = MultiVectorIndex.build(docs, ids=[f"d{i}" for i in range(120)])
    brute = np.array([[scoring.colbert_score(q, d) for d in docs] for q in queries])
    res = index.search(queries, 15, doc_batch=50)
    for i in range(len(queries)):
        ref_s, ref_r = brute_force_top(brute[i], 15)
        np.testing.assert_array_equal(res.rows[i], ref_r)
        np.testing.assert_allclose(res.scores[i], ref_s, rtol=1e-5)
    cands = rng.integers(-1, 120, size=(len(queries), 30))
    reranked = index.rerank(queries, cands, 5)
    for i in range(len(queries)):
        c = np.unique(cands[i][cands[i] >= 0])
        ref_s, ref_r = brute_force_top(brute[i][c], 5)
        np.testing.assert_array_equal(reranked.rows[i][: ref_r.size], c[ref_r])
    index.save(tmp_path / "mv")
    for mmap in (False, True):
        loaded = MultiVectorIndex.load(tmp_path / "mv", mmap=mmap)
        np.testing.assert_array_equal(loaded.search(queries, 15).rows, res.rows)
    half = MultiVectorIndex.build(docs, dtype="float16")
    np.testing.assert_allclose(half.search(queries, 15).scores, res.scores, atol=2e-3)
    with pytest.raises(ValueError, match=r"colbert_vecs\[1\]"):
        MultiVectorIndex.build([np.ones((2, 8)), np.ones((2, 7))])
    with pytest.raises(ValueError, match="dtype"):
        MultiVectorIndex.build(docs, dtype="int8")
    with pytest.raises(ValueError, match="query 0"):
        index.search([np.ones((2, 3))], 3)


# ---------------------------------------------------------------------- fusion
def test_weighted_fusion_scores_the_union_exactly():
    a = SearchResult(np.array([[3.0, 2.0]]), np.array([[0, 1]]))
    b = SearchResult(np.array([[9.0, 1.0]]), np.array([[2, 0]]))
    assert union_rows([a, b]).tolist() == [[0, 1, 2]]
    dense = {0: 0.5, 1: 0.4, 2: 0.1, 3: 0.9}
    sparse = {0: 1.0, 1: 0.0, 2: 3.0, 3: 9.0}
    scorers = [lambda r, t=t: np.vectorize(lambda x: t.get(int(x), -np.inf))(r) for t in (dense, sparse)]
    res = weighted_fusion([a, b], scorers, [1.0, 0.5], k=3)
    # doc 3 is in neither list: never scored; union = {0, 1, 2}
    assert res.rows.tolist() == [[2, 0, 1]]
    np.testing.assert_allclose(res.scores[0], [0.1 + 1.5, 0.5 + 0.5, 0.4])


def test_reciprocal_rank_fusion_hand_computed():
    a = SearchResult(np.array([[3.0, 2.0, -np.inf]]), np.array([[0, 1, -1]]))
    b = SearchResult(np.array([[9.0, 1.0, 0.5]]), np.array([[1, 2, 0]]))
    res = reciprocal_rank_fusion([a, b], k=3, rrf_k=60)
    expected = {0: 1 / 61 + 1 / 63, 1: 1 / 62 + 1 / 61, 2: 1 / 62}
    assert res.rows.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(res.scores[0], [expected[1], expected[0], expected[2]], rtol=1e-6)


# ---------------------------------------------------------------------- export
def test_export_forms(minilm_dir):
    from transformers import AutoTokenizer

    w = {"2054": 0.5, "101": 0.25, "7592": 1.0}
    ids, values = to_indices_values(w)
    assert ids.tolist() == [101, 2054, 7592] and values.tolist() == [0.25, 0.5, 1.0]
    indptr, indices, data = to_csr_arrays([w, {}, {"5": 2.0}])
    assert indptr.tolist() == [0, 3, 3, 4] and indices.tolist() == [101, 2054, 7592, 5]
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    assert to_token_strings({"7592": 1.0, "2088": 0.5}, tok) == {"hello": 1.0, "world": 0.5}
    with pytest.raises(ValueError, match="token id strings"):
        to_indices_values({"hello": 1.0})


# ---------------------------------------------------------------------- real encodings
@pytest.fixture(scope="module")
def manpage_encodings(minilm_dir):
    from trine import M3Embedder
    from trine.datasets.manpages import load_manpages

    try:
        pages = load_manpages(update_package_lists=True)
    except RuntimeError as err:
        unavailable(f"man pages unavailable: {err}")
    pages = pages[::8][:300]
    torch.manual_seed(0)
    model = M3Embedder(minilm_dir, init_missing_heads="neutral", show_progress=False, devices="cpu")
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    docs = model.encode([p.description for p in pages], max_length=128, **kw)
    queries = model.encode([p.name for p in pages[:40]], max_length=32, **kw)
    return pages, docs, queries


def test_real_sparse_and_multivector_equal_brute_force(manpage_encodings):
    pages, docs, queries = manpage_encodings
    check_sparse_equals_brute_force(docs["lexical_weights"], queries["lexical_weights"], k=20)
    index = MultiVectorIndex.build(docs["colbert_vecs"], ids=[p.page for p in pages])
    res = index.search(queries["colbert_vecs"], 10)
    for i, q in enumerate(queries["colbert_vecs"][:10]):
        brute = np.array([scoring.colbert_score(q, d) for d in docs["colbert_vecs"]])
        ref_s, ref_r = brute_force_top(brute, 10)
        np.testing.assert_allclose(res.scores[i], ref_s, rtol=1e-5)
        assert np.isclose(brute[res.rows[i]], ref_s, rtol=1e-5).all()


def test_real_hybrid_retrieval_finds_pages(manpage_encodings, tmp_path):
    pages, docs, queries = manpage_encodings
    ids = [p.page for p in pages]
    retriever = HybridRetriever(DenseIndex.build(docs["dense_vecs"], ids),
                                SparseIndex.build(docs["lexical_weights"], ids),
                                MultiVectorIndex.build(docs["colbert_vecs"], ids))
    reps = QueryReps.from_encode(queries)
    n = len(queries["dense_vecs"])
    hits = {}
    for name, weights in {"dense": {"dense": 1.0}, "all": {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}}.items():
        res = retriever.search(reps, 10, weights, candidate_k=30)
        hits[name] = np.mean([i in res.rows[i] for i in range(n)])
        # fused score equals the weighted exact scores of each returned row
        d = retriever.dense.score(reps.dense_vecs, res.rows)
        s = retriever.sparse.score(reps.lexical_weights, res.rows)
        c = retriever.multivector.score(reps.colbert_vecs, res.rows)
        total = sum(weights.get(m, 0) * np.where(res.rows >= 0, x, 0) for m, x in
                    (("dense", d), ("sparse", s), ("colbert", c)))
        np.testing.assert_allclose(np.where(res.rows >= 0, res.scores, 0), total, rtol=1e-4, atol=1e-5)
    rrf = retriever.search(reps, 10, {"dense": 1.0, "sparse": 1.0, "colbert": 1.0}, fusion="rrf", candidate_k=30)
    retriever.save(tmp_path / "hybrid")
    loaded = HybridRetriever.load(tmp_path / "hybrid")
    again = loaded.search(reps, 10, {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}, candidate_k=30)
    np.testing.assert_array_equal(again.rows, res.rows)
    np.testing.assert_allclose(again.scores, res.scores, rtol=1e-6)
    assert HybridRetriever.from_encoded(docs, ids).ids == ids
    hits["rrf"] = np.mean([i in rrf.rows[i] for i in range(n)])
    # the NAME line finds its own DESCRIPTION among 300 pages for most pages
    assert min(hits.values()) > 0.6, hits
    with pytest.raises(ValueError, match="unknown mode"):
        retriever.search(reps, 10, {"bm25": 1.0})
    with pytest.raises(ValueError, match="fusion"):
        retriever.search(reps, 10, {"dense": 1.0}, fusion="max")


def test_rerank_of_every_row_equals_full_search():
    rng = np.random.default_rng(6)
    docs = random_multivectors(rng, 40)
    queries = random_multivectors(rng, 4)
    index = MultiVectorIndex.build(docs)
    full = index.search(queries, 40)
    everything = np.tile(np.arange(40)[::-1], (4, 1))
    reranked = index.rerank(queries, everything, 40)
    np.testing.assert_array_equal(reranked.rows, full.rows)
    np.testing.assert_allclose(reranked.scores, full.scores, rtol=1e-6)


def test_dense_incremental_add_padding_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    index = DenseIndex(4)
    index.add(x[:3], ids=["a", "b", "c"])
    index.add(x[3:])
    assert index.ids == ["a", "b", "c", "3", "4", "5"]
    res = index.search(x[:1], 10)  # k larger than the corpus: padded
    assert (res.rows[0, 6:] == -1).all() and np.isneginf(res.scores[0, 6:]).all()
    assert sorted(res.rows[0, :6].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="unique"):
        index.add(x[:1], ids=["a"])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least that many"):
        DenseIndex.build(x, kind="ivf", nlist=16)
    with pytest.raises(FileNotFoundError, match="index.json"):
        DenseIndex.load(tmp_path)


def test_hybrid_retriever_errors():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    dense = DenseIndex.build(x)
    with pytest.raises(ValueError, match="same document ids"):
        HybridRetriever(dense, SparseIndex.build([{"1": 1.0}] * 5, ids=list("abcde")))
    retriever = HybridRetriever(dense, SparseIndex.build([{"1": 1.0}] * 5))
    with pytest.raises(ValueError, match="lexical_weights"):
        retriever.search(QueryReps(dense_vecs=x[:1]), 3, {"dense": 1.0, "sparse": 1.0})
    with pytest.raises(ValueError, match="not given"):
        retriever.search(QueryReps(dense_vecs=x[:1]), 3, {"colbert": 1.0})
    with pytest.raises(ValueError, match="candidate_modes"):
        retriever.search(QueryReps(dense_vecs=x[:1]), 3, {"dense": 1.0}, candidate_modes=())
    with pytest.raises(ValueError, match="unknown representation keys"):
        QueryReps.from_encode({"dense_vecs": x, "sparse": []})
    res = retriever.search(QueryReps(x[:2], [{"1": 2.0}, {}]), 3, {"dense": 1.0, "sparse": 0.5},
                           candidate_k=2)
    exact = x[:2] @ x.T + 0.5 * np.array([[2.0] * 5, [0.0] * 5])
    for i in range(2):
        np.testing.assert_allclose(res.scores[i][res.rows[i] >= 0], exact[i][res.rows[i][res.rows[i] >= 0]],
                                   rtol=1e-5)


def test_sparse_impact_quantisation_as_flagembedding(tmp_path):
    rng = np.random.default_rng(9)
    docs = random_lexical(rng, 200)
    queries = random_lexical(rng, 10, max_terms=8)
    index = SparseIndex.build(docs, impact_scale=100)

    def quantised(w):
        return {t: float(math.ceil(v * 100)) for t, v in w.items()}

    brute = scoring.lexical_scores([quantised(q) for q in queries], [quantised(d) for d in docs])
    for i, q in enumerate(queries):
        np.testing.assert_array_equal(index.score_all(q), brute[i])  # integers: exact
    index.save(tmp_path / "q")
    loaded = SparseIndex.load(tmp_path / "q")
    assert loaded.impact_scale == 100
    np.testing.assert_array_equal(loaded.search(queries, 5).rows, index.search(queries, 5).rows)
    with pytest.raises(ValueError, match="impact_scale"):
        SparseIndex.build(docs, impact_scale=0)
