"""The compressed multi-vector (PLAID) index: its scores are a hand decompression's, its candidate generation
finds what exact maxsim finds, and save/load and an interrupted-then-resumed build equal a fresh build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trine.retrieval import ColbertPlaidIndex, HybridRetriever, Index, MultiVectorIndex, check_index, load_index
from trine.retrieval.plaid import build_plaid
from trine.scoring import colbert_scores_flat, colbert_scores_padded, pad_vectors

DIM = 32


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n_docs: int, topics: int = 40, noise: float = 0.25,
              lengths: tuple[int, int] = (4, 24)) -> tuple[np.ndarray, list[np.ndarray]]:
    """Documents whose token vectors lie around a few of ``topics`` centres (unit vectors)."""
    centres = unit(rng.standard_normal((topics, DIM)))
    docs = []
    for _ in range(n_docs):
        mine = rng.choice(topics, size=3, replace=False)
        n = int(rng.integers(*lengths))
        docs.append(unit(centres[rng.choice(mine, size=n)] + noise * rng.standard_normal((n, DIM))))
    return centres, docs


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(29)
    centres, docs = clustered(rng, 400)
    return rng, centres, docs, [f"d{i}" for i in range(len(docs))]


@pytest.fixture(scope="module")
def index(corpus):
    _, _, docs, ids = corpus
    return ColbertPlaidIndex.build(docs, ids, nbits=2, ncentroids=64, seed=3)


def hand_decompress(index: ColbertPlaidIndex, row: int) -> np.ndarray:
    """A document's vectors from the stored codes, bit by bit: centroid + per-dimension bucket weight."""
    a, b = index.offsets[row], index.offsets[row + 1]
    nbits = index.options["nbits"]
    bits = np.unpackbits(index.packed[a:b], axis=1).reshape(b - a, DIM, nbits)  # most significant bit first
    buckets = (bits * (1 << np.arange(nbits - 1, -1, -1))).sum(-1)
    weights = index.codec.weights[np.arange(DIM)[None, :], buckets]
    v = index.codec.centroids[index.codes[a:b].astype(int)] + weights
    return unit(v) if index.codec.normalized else v


def test_protocol_options_and_determinism(corpus, index):
    _, _, docs, ids = corpus
    assert isinstance(index, Index) and check_index(index, "colbert") is index
    assert len(index) == len(docs) and list(index.ids) == ids
    assert index.codec.normalized and index.bytes_per_token == 2 + DIM * 2 / 8
    with pytest.raises(TypeError, match="unknown plaid index options.*'nbit'"):
        ColbertPlaidIndex.build(docs, nbit=2)
    with pytest.raises(ValueError, match="nbits must be one of"):
        ColbertPlaidIndex.build(docs, nbits=3)
    with pytest.raises(ValueError, match="ncandidates must be a positive integer"):
        ColbertPlaidIndex.build(docs, ncandidates=0)
    with pytest.raises(ValueError, match=r"colbert_vecs\[1\] has shape"):
        ColbertPlaidIndex.build([docs[0], docs[1][:, :5]])
    again = ColbertPlaidIndex.build(docs, ids, nbits=2, ncentroids=64, seed=3)
    np.testing.assert_array_equal(again.codes, index.codes)
    np.testing.assert_array_equal(again.packed, index.packed)
    np.testing.assert_array_equal(again.codec.centroids, index.codec.centroids)


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_codec_is_a_hand_quantisation(corpus, nbits):
    """Cutoffs and weights are the residuals' per-dimension quantiles; each token's bucket is where its residual
    falls among the cutoffs; decompression is centroid + bucket weight, re-normalised."""
    _, _, docs, _ = corpus
    docs = docs[:120]
    index = ColbertPlaidIndex.build(docs, nbits=nbits, ncentroids=32, seed=1)  # every token is in the sample
    vectors = np.concatenate(docs)
    centroids = index.codec.centroids
    nearest = ((vectors[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(index.codes, nearest)
    residuals = vectors - centroids[nearest]
    b = 1 << nbits
    np.testing.assert_allclose(index.codec.cutoffs, np.quantile(residuals, np.arange(1, b) / b, axis=0).T, atol=1e-6)
    np.testing.assert_allclose(index.codec.weights, np.quantile(residuals, (np.arange(b) + 0.5) / b, axis=0).T,
                               atol=1e-6)
    buckets = np.stack([np.searchsorted(index.codec.cutoffs[d], residuals[:, d], side="right") for d in range(DIM)], 1)
    bits = ((buckets[:, :, None] >> np.arange(nbits - 1, -1, -1)) & 1).reshape(len(vectors), -1)
    np.testing.assert_array_equal(index.packed, np.packbits(bits.astype(np.uint8), axis=1))
    for row in (0, 7, 119):
        np.testing.assert_allclose(index.doc_vectors(row), hand_decompress(index, row), atol=1e-6)
    # quantisation error shrinks with more bits
    error = np.abs(np.concatenate([index.doc_vectors(r) for r in range(len(docs))]) - vectors).mean()
    assert error < {1: 0.1, 2: 0.06, 4: 0.02}[nbits]


@pytest.mark.parametrize("opq", [False, True])
def test_pq_codec_is_a_hand_product_quantisation(corpus, opq):
    """pq_bytes: each token's byte j names the codeword of sub-space j nearest its residual's j-th sub-vector; it
    decompresses to centroid + the codewords side by side (re-normalised); scores are maxsim on exactly that.
    With opq (the default with pq_bytes) all of it happens after an orthonormal rotation R (x @ R.T), and the
    decompressed vectors are rotated back (@ R)."""
    rng, _, docs, _ = corpus
    docs = docs[:120]
    index = ColbertPlaidIndex.build(docs, pq_bytes=8, ncentroids=32, seed=1, **({} if opq else {"opq": False}))
    assert index.options["nbits"] is None and index.options["pq_bytes"] == 8 and index.bytes_per_token == 2 + 8
    assert index.options["opq"] is opq and (index.codec.rotation is not None) is opq
    assert index.packed.shape == (int(index.offsets[-1]), 8) and index.codec.codebooks.shape == (8, 256, DIM // 8)
    rotation = index.codec.rotation if opq else np.eye(DIM, dtype=np.float32)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(DIM), atol=1e-5)
    vectors = np.concatenate(docs) @ rotation.T
    centroids, books = index.codec.centroids, index.codec.codebooks
    nearest = ((vectors[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(index.codes, nearest)
    residuals = (vectors - centroids[nearest]).reshape(len(vectors), 8, DIM // 8)
    words = ((residuals[:, :, None, :] - books[None]) ** 2).sum(-1).argmin(-1)  # (tokens x 8)
    np.testing.assert_array_equal(index.packed, words)
    hand = unit(centroids[nearest] + books[np.arange(8)[None, :], words].reshape(len(vectors), DIM)) @ rotation
    got = np.concatenate([index.doc_vectors(r) for r in range(len(docs))])
    np.testing.assert_allclose(got, hand, atol=1e-5)
    assert np.abs(got - np.concatenate(docs)).mean() < 0.06  # about 2 bits' error at a quarter of their bytes
    queries = [unit(rng.standard_normal((4, DIM))) for _ in range(3)]
    rows = rng.integers(0, len(docs), size=(3, 9))
    offsets = index.offsets
    exact_on_hand = MultiVectorIndex.build([hand[offsets[r]:offsets[r + 1]] for r in range(len(docs))])
    np.testing.assert_allclose(index.score(queries, rows), exact_on_hand.score(queries, rows), atol=1e-5)
    found = index.search(queries, 5, ncandidates=len(docs))  # every document a candidate: exact on the hand vectors
    np.testing.assert_allclose(found.scores, exact_on_hand.search(queries, 5).scores, atol=1e-5)
    if not opq:
        return
    with pytest.raises(ValueError, match="opq .* goes with pq_bytes, not nbits"):
        ColbertPlaidIndex.build(docs, nbits=2, opq=True)
    with pytest.raises(ValueError, match="opq must be true or false"):
        ColbertPlaidIndex.build(docs, pq_bytes=8, opq=1)
    with pytest.raises(ValueError, match="two codings of the residual"):
        ColbertPlaidIndex.build(docs, pq_bytes=8, nbits=2)
    with pytest.raises(ValueError, match="pq_bytes 5 must divide the vectors' dim 32"):
        ColbertPlaidIndex.build(docs, pq_bytes=5, ncentroids=32)
    with pytest.raises(ValueError, match="pq_bytes must be a positive integer"):
        ColbertPlaidIndex.build(docs, pq_bytes=0)


def test_token_pooling_merges_a_documents_similar_tokens():
    """pool_tokens: duplicated tokens merge back into the distinct ones; ceil(n / factor) unit vectors are kept."""
    from trine.retrieval.plaid import pool_tokens

    rng = np.random.default_rng(11)
    distinct = unit(rng.standard_normal((5, DIM)))
    doubled = unit(np.repeat(distinct, 2, axis=0) + 1e-3 * rng.standard_normal((10, DIM)))
    pooled = pool_tokens(doubled[rng.permutation(10)], 2)
    assert pooled.shape == (5, DIM)
    # each distinct vector has exactly one pooled vector next to it
    np.testing.assert_allclose(np.sort((pooled @ distinct.T).max(0)), np.ones(5), atol=1e-5)
    np.testing.assert_array_equal(np.sort((pooled @ distinct.T).argmax(1)), np.arange(5))
    ten = unit(rng.standard_normal((10, DIM)))
    three = pool_tokens(ten, 3)
    assert three.shape == (4, DIM) and np.allclose(np.linalg.norm(three, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pool_tokens(ten, 1), ten)
    np.testing.assert_array_equal(pool_tokens(ten[:1], 2), ten[:1])


def test_a_pooled_index_stores_and_scores_the_pooled_vectors(corpus):
    """pool_factor: the index holds ceil(n / factor) tokens per document, the codec's compression of the pooled
    vectors; its scores are maxsim on their hand decompression."""
    from trine.retrieval.plaid import pool_tokens

    rng, _, docs, ids = corpus
    index = ColbertPlaidIndex.build(docs, ids, nbits=2, pool_factor=2, ncentroids=64, seed=3)
    pooled = [pool_tokens(d, 2) for d in docs]
    np.testing.assert_array_equal(np.diff(index.offsets), [-(-len(d) // 2) for d in docs])
    codes, packed = index.codec.compress(np.concatenate(pooled))
    np.testing.assert_array_equal(index.codes, codes)
    np.testing.assert_array_equal(index.packed, packed)
    queries = [unit(rng.standard_normal((5, DIM))) for _ in range(4)]
    rows = rng.integers(0, len(docs), size=(4, 10))
    hand = MultiVectorIndex.build([hand_decompress(index, r) for r in range(len(docs))])
    np.testing.assert_allclose(index.score(queries, rows), hand.score(queries, rows), atol=1e-5)
    # added documents are pooled alike
    index.add(docs[:2], ["x0", "x1"])
    np.testing.assert_array_equal(np.diff(index.offsets)[-2:], [-(-len(d) // 2) for d in docs[:2]])
    np.testing.assert_array_equal(index.codes[-len(pooled[0]) - len(pooled[1]):], codes[:len(pooled[0]) + len(
        pooled[1])])
    # pooled tokens still find a document from its own tokens
    queries = [unit(docs[t][:6] + 0.02 * rng.standard_normal((min(6, len(docs[t])), DIM))) for t in (3, 50, 201)]
    np.testing.assert_array_equal(index.search(queries, 1).rows[:, 0], [3, 50, 201])


def test_nbytes_counts_every_stored_array(corpus, index):
    stored = index.codes.nbytes + index.packed.nbytes + index.offsets.nbytes
    codec = index.codec.centroids.nbytes + index.codec.cutoffs.nbytes + index.codec.weights.nbytes
    assert index.nbytes == stored + codec


def test_scores_equal_exact_maxsim_on_hand_decompressed_vectors(corpus, index):
    rng, _, docs, _ = corpus
    queries = [unit(rng.standard_normal((int(rng.integers(2, 9)), DIM))) for _ in range(5)]
    rows = rng.integers(0, len(docs), size=(5, 12))
    rows[1, 3:] = -1
    hand = MultiVectorIndex.build([hand_decompress(index, r) for r in range(len(docs))])
    got = index.score(queries, rows)
    np.testing.assert_allclose(got, hand.score(queries, rows), atol=1e-5)
    assert np.isneginf(got[1, 3:]).all()
    result = index.search(queries, 5)
    np.testing.assert_allclose(index.score(queries, result.rows), result.scores, atol=1e-6)
    assert (np.diff(result.scores, axis=1) <= 0).all()


def test_candidate_generation_finds_the_exact_top_document(corpus, index):
    """Queries made of a document's own tokens (slightly moved) have that document as their exact best."""
    rng, _, docs, _ = corpus
    targets = rng.choice(len(docs), size=30, replace=False)
    queries = [unit(docs[t][: min(6, len(docs[t]))] + 0.02 * rng.standard_normal((min(6, len(docs[t])), DIM)))
               for t in targets]
    exact = MultiVectorIndex.build(docs).search(queries, 1)
    np.testing.assert_array_equal(exact.rows[:, 0], targets)
    for nprobe, ncandidates in ((1, 8), (8, 256)):
        found = index.search(queries, 3, nprobe=nprobe, ncandidates=ncandidates)
        np.testing.assert_array_equal(found.rows[:, 0], targets)
        for q, t in zip(queries, targets):
            candidates = index.candidates(q, nprobe, ncandidates)
            assert t in candidates and len(candidates) <= ncandidates


def test_full_centroid_interaction_is_a_hand_centroid_maxsim(corpus, index):
    """With every probed document kept by the pruned stage, the candidates are the ``ncandidates`` probed documents
    with the best maxsim over their tokens' centroids; interaction_factor 1 skips that stage."""
    rng, _, docs, _ = corpus
    q = unit(rng.standard_normal((5, DIM)))
    centroids = index.codec.centroids
    probed = set(np.argsort(-(q @ centroids.T), axis=1)[:, :2].ravel().tolist())
    rows = [r for r in range(len(docs)) if probed & set(index.codes[index.offsets[r]:index.offsets[r + 1]].tolist())]
    assert len(rows) > 20
    full = np.array([(q @ centroids[index.codes[index.offsets[r]:index.offsets[r + 1]].astype(int)].T).max(1).sum()
                     for r in rows])
    want = np.sort(np.array(rows)[np.argsort(-full)[:20]])
    np.testing.assert_array_equal(index.candidates(q, nprobe=2, ncandidates=20, interaction_factor=1000), want)
    pruned = index.candidates(q, nprobe=2, ncandidates=20, interaction_factor=1)
    assert len(pruned) == 20 and set(pruned) <= set(rows)
    with pytest.raises(ValueError, match="interaction_factor must be a positive integer"):
        index.candidates(q, interaction_factor=0)


def test_recall_against_exact_maxsim_on_a_clustered_set():
    rng = np.random.default_rng(7)
    centres, docs = clustered(rng, 1500, topics=60, noise=0.05)
    queries = []
    for _ in range(40):
        mine = rng.choice(60, size=2, replace=False)
        queries.append(unit(centres[rng.choice(mine, size=6)] + 0.05 * rng.standard_normal((6, DIM))))
    exact = MultiVectorIndex.build(docs).search(queries, 10)
    # near-ties abound here (documents share topics), so the residual's bits decide the tail of the top 10
    index = ColbertPlaidIndex.build(docs, nbits=4, ncentroids=128, nprobe=8, ncandidates=256)
    found = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.rows.tolist(), exact.rows.tolist())])
    assert recall >= 0.9, recall
    assert np.mean(found.rows[:, 0] == exact.rows[:, 0]) >= 0.9
    # the candidate stage alone: the exact top 10 are nearly all among the decompressed candidates
    caught = np.mean([np.isin(e, index.candidates(q)).mean() for q, e in zip(queries, exact.rows)])
    assert caught >= 0.97, caught


def test_save_load_equals_the_index_in_memory(corpus, index, tmp_path):
    rng, _, _, _ = corpus
    queries = [unit(rng.standard_normal((5, DIM))) for _ in range(4)]
    index.save(tmp_path / "plaid")
    with pytest.raises(ValueError, match="exists"):
        index.save(tmp_path / "plaid")
    loaded = load_index(tmp_path / "plaid")
    assert isinstance(loaded, ColbertPlaidIndex) and loaded.ids == index.ids and loaded.options == index.options
    for name in ("codes", "packed", "offsets"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    a, b = index.search(queries, 7), loaded.search(queries, 7)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)
    # a HybridRetriever holding it saves and loads it by its kind
    HybridRetriever(indexes={"colbert": index}).save(tmp_path / "hybrid")
    assert isinstance(HybridRetriever.load(tmp_path / "hybrid").multivector, ColbertPlaidIndex)
    # a rotated product-quantised index round-trips with its rotation; one saved before OPQ (no "opq" in
    # index.json) loads unrotated
    docs = corpus[2][:150]
    for opq in (True, False):
        pq = ColbertPlaidIndex.build(docs, pq_bytes=8, ncentroids=32, opq=opq)
        folder = tmp_path / f"pq-{opq}"
        pq.save(folder)
        if not opq:
            meta = json.loads((folder / "index.json").read_text())
            del meta["options"]["opq"]
            (folder / "index.json").write_text(json.dumps(meta))
        back = load_index(folder)
        assert back.options["opq"] is opq and (back.codec.rotation is not None) is opq
        np.testing.assert_array_equal(back.search(queries, 7).scores, pq.search(queries, 7).scores)


def test_add_compresses_with_the_trained_codec(corpus):
    _, _, docs, ids = corpus
    index = ColbertPlaidIndex.build(docs[:300], ids[:300], ncentroids=32)
    centroids = index.codec.centroids.copy()
    with pytest.raises(ValueError, match="unique"):
        index.add(docs[300:302], ["d0", "x"])
    assert len(index) == 300
    index.add(docs[300:], ids[300:])
    assert len(index) == len(docs) and index.ids[-1] == ids[-1]
    np.testing.assert_array_equal(index.codec.centroids, centroids)
    np.testing.assert_allclose(index.doc_vectors(350), hand_decompress(index, 350), atol=1e-6)
    query = unit(docs[350][:4])
    assert index.search([query], 1).rows[0, 0] == 350


@pytest.mark.parametrize("options,other", [
    ({"nbits": 2, "ncentroids": 48, "sample_tokens": 2000, "seed": 5}, {"nbits": 4}),
    ({"pq_bytes": 8, "pool_factor": 2, "ncentroids": 48, "sample_tokens": 2000, "seed": 5}, {"pool_factor": 3}),
])
def test_an_interrupted_build_resumes_to_a_fresh_build(corpus, tmp_path, options, other):
    _, _, docs, ids = corpus
    cuts = [0, 90, 170, 260, 400]
    calls = [0] * 4
    fail_at = {"part": 2, "call": 3}  # part 2's third read: after the token counts and the sample, while compressing

    def part(i: int):
        def read():
            calls[i] += 1
            if i == fail_at["part"] and calls[i] == fail_at["call"]:
                raise KeyboardInterrupt("killed")
            return ids[cuts[i]:cuts[i + 1]], docs[cuts[i]:cuts[i + 1]]
        return read

    parts = [part(i) for i in range(4)]
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        build_plaid(parts, work, **options)
    assert (work / "codec").is_dir() and (work / "part-00001").is_dir() and not (work / "part-00002").exists()
    before = list(calls)
    with pytest.raises(ValueError, match=f"other {next(iter(other))}"):
        build_plaid(parts, work, **{**options, **other})
    resumed = build_plaid(parts, work, **options)
    assert calls[0] == before[0] and calls[1] == before[1]  # finished parts are not read again
    fresh = ColbertPlaidIndex.build(docs, ids, **options)  # one part, no work folder
    assert resumed.ids == fresh.ids and resumed.options == fresh.options
    for name in ("codes", "packed", "offsets"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(fresh, name))
    np.testing.assert_array_equal(resumed.codec.centroids, fresh.codec.centroids)
    if fresh.codec.codebooks is not None:
        np.testing.assert_array_equal(resumed.codec.codebooks, fresh.codec.codebooks)
    q = [docs[5][:3]]
    np.testing.assert_array_equal(resumed.search(q, 5).rows, fresh.search(q, 5).rows)
    # and saved and loaded, the same again
    fresh.save(tmp_path / "saved")
    loaded = load_index(tmp_path / "saved")
    assert loaded.options == fresh.options
    for name in ("codes", "packed", "offsets"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fresh, name))
    a, b = fresh.search(q, 5), loaded.search(q, 5)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_uses_trine_maxsim_scale():
    """Scores are trine.scoring's maxsim (mean over query tokens): a document's own exact copy scores near 1."""
    rng = np.random.default_rng(0)
    _, docs = clustered(rng, 60)
    index = ColbertPlaidIndex.build(docs, nbits=4, ncentroids=16)
    score = index.score([docs[3]], np.array([[3]]))[0, 0]
    assert 0.97 < score <= 1.0 + 1e-5


def test_flat_maxsim_equals_the_padded_maxsim():
    """The last stage's unpadded maxsim (numpy) gives trine.scoring's padded maxsim, empty documents included."""
    rng = np.random.default_rng(4)
    docs = [rng.standard_normal((n, DIM)).astype(np.float32) for n in (3, 0, 7, 1, 12)]
    q = rng.standard_normal((5, DIM)).astype(np.float32)
    qv, qm = pad_vectors([q])
    pv, pm = pad_vectors(docs)
    want = colbert_scores_padded(qv, qm, pv, pm)[0].numpy()
    got = colbert_scores_flat(q, np.concatenate(docs), np.array([len(d) for d in docs]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[1] == 0.0


def test_eval_config_checks_the_colbert_index_options():
    from trine.evaluation import EvalConfig

    assert EvalConfig(colbert_index="plaid", colbert_index_options={"nbits": 4}).colbert_index == "plaid"
    with pytest.raises(ValueError, match="colbert_index must be one of"):
        EvalConfig(colbert_index="pq")
    with pytest.raises(ValueError, match="are the plaid index's"):
        EvalConfig(colbert_index_options={"nbits": 4})
    with pytest.raises(ValueError, match="unknown plaid index options"):
        EvalConfig(colbert_index="plaid", colbert_index_options={"bits": 4})
    with pytest.raises(ValueError, match="keeps its own multi-vectors"):
        EvalConfig(colbert_index="plaid", backend="qdrant")
