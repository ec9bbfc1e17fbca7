"""One encoder, one result: ``Encoder.encode_result`` behind ``Embedder`` and ``M3Embedder``, the
``EncodeResult`` dictionary, and pair scores computed in one place (``scoring.paired_scores``)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEXTS

from trine import Embedder, M3Embedder, scoring
from trine.curation.teacher import M3_MODES, EmbedderScorer
from trine.inference import Encoder, EncodeResult
from trine.inference.result import check_outputs

ALL = ("dense", "sparse", "colbert")


def same(a, b) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_encode_result_is_flagembeddings_dictionary():
    vecs = np.arange(6, dtype=np.float32).reshape(2, 3)
    r = EncodeResult(dense_vecs=vecs, lexical_weights=[{"5": 0.5}, {}])
    assert isinstance(r, dict)  # FlagEmbedding's evaluation tells results apart with isinstance(x, dict)
    assert list(r) == list(r.keys()) == ["dense_vecs", "lexical_weights", "colbert_vecs"]
    assert r["dense_vecs"] is r.dense_vecs is vecs and r.get("colbert_vecs") is None and "colbert_vecs" in r
    assert dict(r.items())["lexical_weights"] == [{"5": 0.5}, {}]
    assert r.outputs == ("dense", "sparse")
    rows = r.rows()
    assert len(rows) == 2 and rows[1][1] == {} and rows[0][2] is None
    back = EncodeResult.from_rows(rows, ("sparse", "dense"))
    assert same(back.dense_vecs, vecs) and back.lexical_weights == r.lexical_weights and back.colbert_vecs is None
    one = r.first()
    assert same(one.dense_vecs, vecs[0]) and one.lexical_weights == {"5": 0.5} and one.colbert_vecs is None
    assert EncodeResult.from_rows([], ["dense"], dense_dim=4).dense_vecs.shape == (0, 4)
    with pytest.raises(ValueError, match="different numbers of texts"):
        EncodeResult(dense_vecs=vecs, lexical_weights=[{}]).rows()
    assert check_outputs(["colbert", "dense"]) == ("dense", "colbert") and check_outputs("sparse") == ("sparse",)
    with pytest.raises(ValueError, match="unknown outputs"):
        check_outputs(["dense", "lexical"])


def test_one_encoder_behind_both_faces(tiny_m3_dir):
    instr = "query: "
    dense = Embedder(tiny_m3_dir, show_progress=False, query_instruction_for_retrieval=instr, query_max_length=16)
    m3 = M3Embedder(tiny_m3_dir, show_progress=False, query_instruction_for_retrieval=instr, query_max_length=16)
    assert isinstance(dense, Encoder) and isinstance(m3, Encoder)
    assert dense.outputs == ("dense",) and m3.outputs == ALL  # what the checkpoint was loaded with, not the class
    # the same encoder: the same dense vectors from either face, through either method
    full = m3.encode_result(TEXTS, ALL)
    assert same(dense.encode(TEXTS), full.dense_vecs)
    assert same(dense.encode_result(TEXTS).dense_vecs, full.dense_vecs)
    enc = m3.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert type(enc) is EncodeResult and same(enc["dense_vecs"], full.dense_vecs)
    assert enc["lexical_weights"] == full.lexical_weights
    assert all(same(a, b) for a, b in zip(enc["colbert_vecs"], full.colbert_vecs))
    # kind: the encoder's own instruction and maximum length, as encode_queries / encode_corpus
    q = m3.encode_result(TEXTS, ("dense", "sparse"), kind="query")
    assert same(q.dense_vecs, dense.encode_queries(TEXTS)) and q.colbert_vecs is None
    assert q.lexical_weights == m3.encode_queries(TEXTS, return_sparse=True)["lexical_weights"]
    assert same(q.dense_vecs, dense.encode([instr + t for t in TEXTS], max_length=16))
    assert same(m3.encode_result(TEXTS, kind="passage").dense_vecs, dense.encode_corpus(TEXTS))
    # one string: one text's encodings, as FlagEmbedding
    one, listed = m3.encode_result(TEXTS[2], ALL), m3.encode_result(TEXTS[2:3], ALL)
    assert same(one.dense_vecs, listed.dense_vecs[0]) and one.lexical_weights == listed.lexical_weights[0]
    assert same(one.colbert_vecs, listed.colbert_vecs[0])
    with pytest.raises(ValueError, match="without heads"):
        dense.encode_result(TEXTS, ("dense", "sparse"))
    with pytest.raises(ValueError, match="kind"):
        m3.encode_result(TEXTS, kind="document")
    with pytest.raises(ValueError, match="instruction"):
        m3.encode_result(TEXTS, kind="query", instruction="x")
    with pytest.raises(TypeError, match="with_heads"):
        Embedder(tiny_m3_dir, init_missing_heads="random")


def test_pair_scores_in_one_place(tiny_m3_dir):
    m3 = M3Embedder(tiny_m3_dir, show_progress=False)
    pairs = [(a, b) for a in TEXTS[:3] for b in TEXTS[2:]]
    weights = [0.5, 0.2, 0.3]
    reference = m3.compute_score(pairs, weights_for_different_modes=weights)
    q = m3.encode_result([a for a, _ in pairs], ALL)
    p = m3.encode_result([b for _, b in pairs], ALL)
    got = scoring.paired_scores(q, p, weights)
    assert list(got) == list(scoring.HYBRID_KEYS) == list(reference)
    for mode in reference:
        assert got[mode].tolist() == reference[mode]  # compute_score is this function
    # by hand, for the record
    np.testing.assert_allclose(got["dense"], (q.dense_vecs * p.dense_vecs).sum(1), rtol=1e-6)
    assert got["sparse"][0] == scoring.lexical_matching_score(q.lexical_weights[0], p.lexical_weights[0])
    assert got["colbert"][1] == pytest.approx(scoring.colbert_score(q.colbert_vecs[1], p.colbert_vecs[1]), abs=1e-6)
    # only what both sides hold is scored, and only the means of those
    part = scoring.paired_scores(EncodeResult(q.dense_vecs, q.lexical_weights), p)
    assert list(part) == ["dense", "sparse", "sparse+dense"]
    assert list(scoring.paired_scores(EncodeResult(colbert_vecs=q.colbert_vecs), p)) == ["colbert"]
    # the teacher is the same computation (no instruction set here, so the same encodings)
    for mode in M3_MODES:
        scores = EmbedderScorer(m3, mode, weights)([a for a, _ in pairs], [b for _, b in pairs])
        assert scores.tolist() == reference[mode], mode
    with pytest.raises(ValueError, match="not available"):
        EmbedderScorer(Embedder(tiny_m3_dir, show_progress=False), "colbert")
