"""The Index protocol: trine's three indexes implement it, and HybridRetriever takes any index that does."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import pytest

from trine.retrieval import (
    DenseIndex,
    HybridRetriever,
    Index,
    MultiVectorIndex,
    QueryReps,
    SearchResult,
    SparseIndex,
    check_index,
    load_index,
    protocol,
    register_index,
)
from trine.retrieval.base import pad_results, top_k


def random_docs(rng: np.random.Generator, n: int) -> dict:
    dense = rng.standard_normal((n, 16)).astype(np.float32)
    lexical = []
    for _ in range(n):
        terms = rng.choice(200, size=int(rng.integers(1, 20)), replace=False)
        lexical.append({str(t): float(np.float32(w)) for t, w in zip(terms, rng.random(terms.size) + 0.01)})
    colbert = []
    for _ in range(n):
        v = rng.standard_normal((int(rng.integers(1, 10)), 8)).astype(np.float32)
        colbert.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return {"dense_vecs": dense, "lexical_weights": lexical, "colbert_vecs": colbert}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(14)
    return random_docs(rng, 150), random_docs(rng, 12)


BUILDERS = {
    "dense": (DenseIndex, "dense_vecs"),
    "sparse": (SparseIndex, "lexical_weights"),
    "colbert": (MultiVectorIndex, "colbert_vecs"),
}


@pytest.mark.parametrize("mode", list(BUILDERS))
def test_trine_indexes_implement_the_protocol(mode, data, tmp_path):
    docs, queries = data
    cls, key = BUILDERS[mode]
    ids = [f"d{i}" for i in range(150)]
    index = cls.build(docs[key], ids)
    assert isinstance(index, Index) and check_index(index, mode) is index
    assert index.representation == mode and len(index) == 150 and list(index.ids) == ids
    q = queries[key]
    res = index.search(q, 10)
    assert isinstance(res, SearchResult) and res.rows.shape == (12, 10)
    # behaviour: the exact score of each returned row is the score search gave it
    valid = res.rows >= 0
    assert valid.sum() > 12 * 5
    rescored = index.score(q, res.rows)
    np.testing.assert_allclose(rescored[valid], res.scores[valid], rtol=1e-5, atol=1e-6)
    assert np.isneginf(rescored[~valid]).all()
    # add: two batches give the index one build gives; a bad batch changes nothing
    grown = cls.build(docs[key][:100], ids[:100])
    with pytest.raises(ValueError, match="unique"):
        grown.add(docs[key][100:], ["d0"] + ids[101:])
    assert len(grown) == 100
    grown.add(docs[key][100:], ids[100:])
    assert list(grown.ids) == ids
    again = grown.search(q, 10)
    np.testing.assert_array_equal(again.rows, res.rows)
    np.testing.assert_allclose(again.scores, res.scores, rtol=1e-6)
    # save / load, through the kind its index.json names
    index.save(tmp_path / mode)
    with pytest.raises(ValueError, match="--overwrite"):
        index.save(tmp_path / mode)
    index.save(tmp_path / mode, overwrite=True)
    loaded = load_index(tmp_path / mode)
    assert type(loaded) is cls and list(loaded.ids) == ids
    np.testing.assert_array_equal(loaded.search(q, 10).rows, res.rows)


def test_sparse_add_to_an_empty_index_and_bad_batches():
    index = SparseIndex()
    assert len(index) == 0 and (index.search([{"1": 1.0}], 3).rows == -1).all()
    index.add([{"1": 1.0, "2": 0.5}], ["a"])
    index.add([{"2": 2.0, "3": 1.0}, {}])
    assert index.ids == ["a", "1", "2"]
    with pytest.raises(ValueError, match=r"lexical_weights\[1\].*'9'"):
        index.add([{"4": 1.0}, {"9": -1.0}])
    assert len(index) == 3 and "4" not in index.vocab  # nothing of the bad batch stays
    np.testing.assert_allclose(index.score([{"2": 1.0, "1": 1.0}], np.array([[0, 1, 2]])), [[1.5, 2.0, 0.0]])
    with pytest.raises(ValueError, match="or none"):
        SparseIndex({}, None, None, None, [])


# ---------------------------------------------------------------------- a backend written outside trine
class NumpyDenseIndex:
    """Brute-force inner product over a numpy matrix: a stand-in for a vector-database collection."""

    representation = "dense"

    def __init__(self, vectors: np.ndarray, ids: list[str]):
        self.vectors, self.ids = vectors, ids

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, docs: np.ndarray, ids: Sequence[str] | None = None) -> NumpyDenseIndex:
        index = cls(np.zeros((0, np.shape(docs)[1]), np.float32), [])
        index.add(docs, ids)
        return index

    def add(self, docs: np.ndarray, ids: Sequence[str] | None = None) -> None:
        new = [str(i) for i in ids] if ids is not None else [str(len(self) + i) for i in range(len(docs))]
        self.vectors = np.concatenate([self.vectors, np.asarray(docs, np.float32)])
        self.ids = self.ids + new

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        scores = np.asarray(queries, np.float32) @ self.vectors.T
        return pad_results([top_k(s, k) for s in scores], k)

    def score(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.einsum("qd,qmd->qm", np.asarray(queries, np.float32), self.vectors[np.maximum(rows, 0)])
        return np.where(rows >= 0, out, -np.inf)

    def save(self, path, *, overwrite: bool = False) -> None:
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} exists")
        os.makedirs(path, exist_ok=True)
        np.save(os.path.join(path, "vectors.npy"), self.vectors)
        with open(os.path.join(path, "index.json"), "w") as f:
            json.dump({"kind": "test-numpy-dense", "ids": self.ids}, f)

    @classmethod
    def load(cls, path) -> NumpyDenseIndex:
        with open(os.path.join(path, "index.json")) as f:
            ids = json.load(f)["ids"]
        return cls(np.load(os.path.join(path, "vectors.npy")), ids)


def test_a_new_backend_plugs_into_hybrid_retriever(data, tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "_KINDS", dict(protocol._KINDS))  # the registration below stays in this test
    docs, queries = data
    ids = [f"d{i}" for i in range(150)]
    toy = NumpyDenseIndex.build(docs["dense_vecs"], ids)
    assert isinstance(toy, Index)
    sparse = SparseIndex.build(docs["lexical_weights"], ids)
    colbert = MultiVectorIndex.build(docs["colbert_vecs"], ids)
    ours = HybridRetriever(DenseIndex.build(docs["dense_vecs"], ids), sparse, colbert)
    theirs = HybridRetriever(indexes={"dense": toy, "sparse": sparse, "colbert": colbert})
    assert theirs.dense is toy and theirs.multivector is colbert and list(theirs.ids) == ids
    reps = QueryReps.from_encode(queries)
    for weights, fusion in (({"dense": 1.0}, "weighted"), ({"dense": 1.0, "sparse": 0.3}, "weighted"),
                            ({"dense": 1.0, "sparse": 0.3, "colbert": 1.0}, "weighted"),
                            ({"dense": 1.0, "sparse": 1.0, "colbert": 1.0}, "rrf")):
        a = ours.search(reps, 10, weights, candidate_k=20, fusion=fusion)
        b = theirs.search(reps, 10, weights, candidate_k=20, fusion=fusion)
        np.testing.assert_array_equal(b.rows, a.rows)
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5)
    # the toy backend is also the only index: dense first stage only
    alone = HybridRetriever(toy).search(QueryReps(dense_vecs=queries["dense_vecs"]), 5, {"dense": 1.0},
                                        candidate_modes=("dense",))
    np.testing.assert_array_equal(alone.rows, ours.first_stage(reps, "dense", 5).rows)
    # a saved retriever loads its parts by the kind each part's index.json names
    theirs.save(tmp_path / "h")
    with pytest.raises(ValueError, match="'test-numpy-dense'"):
        HybridRetriever.load(tmp_path / "h")
    register_index("test-numpy-dense", NumpyDenseIndex)
    loaded = HybridRetriever.load(tmp_path / "h")
    assert isinstance(loaded.dense, NumpyDenseIndex)
    b = loaded.search(reps, 10, {"dense": 1.0, "sparse": 0.3}, candidate_k=20)
    np.testing.assert_array_equal(b.rows, ours.search(reps, 10, {"dense": 1.0, "sparse": 0.3}, candidate_k=20).rows)


def test_hybrid_retriever_refuses_what_is_not_an_index(data):
    docs, _ = data
    dense = DenseIndex.build(docs["dense_vecs"])
    sparse = SparseIndex.build(docs["lexical_weights"])
    with pytest.raises(TypeError, match=r"dense index: a ndarray is not a trine Index \(missing representation"):
        HybridRetriever(docs["dense_vecs"])
    with pytest.raises(ValueError, match="over 'sparse', got one over 'dense'"):
        HybridRetriever(sparse=dense)
    with pytest.raises(ValueError, match="given twice"):
        HybridRetriever(dense, indexes={"dense": dense})
    with pytest.raises(ValueError, match="unknown mode 'bm25'"):
        HybridRetriever(indexes={"bm25": sparse})
    with pytest.raises(ValueError, match="same document ids"):
        HybridRetriever(dense, SparseIndex.build(docs["lexical_weights"][:10]))
