"""Parity with the installed FlagEmbedding (1.4.2) on the same tiny BGE-M3-layout checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEXTS, make_tiny_m3, require

from trine import M3Embedder, TriHeadModel

FlagEmbedding = require("FlagEmbedding")


@pytest.fixture(scope="module")
def flag_model(tiny_m3_dir):
    return FlagEmbedding.BGEM3FlagModel(tiny_m3_dir, use_fp16=False, devices="cpu")


@pytest.fixture(scope="module")
def trine_model(tiny_m3_dir):
    return M3Embedder(tiny_m3_dir, show_progress=False)


def assert_same_encoding(a: dict, b: dict, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=atol, rtol=0)
    assert len(a["lexical_weights"]) == len(b["lexical_weights"])
    for x, y in zip(a["lexical_weights"], b["lexical_weights"]):
        assert set(x) == set(y)
        for k in x:
            assert abs(float(x[k]) - y[k]) <= atol
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("max_length,batch_size", [(512, 3), (12, 5), (40, 256)])
def test_encode_matches_flagembedding(flag_model, trine_model, max_length, batch_size):
    texts = TEXTS * 3  # mixed lengths; with max_length 12 and 40 most texts are truncated
    kw = dict(batch_size=batch_size, max_length=max_length, return_dense=True, return_sparse=True,
              return_colbert_vecs=True)
    a = flag_model.encode(texts, **kw)
    b = trine_model.encode(texts, **kw)
    assert_same_encoding(a, b)
    longest = max(len(v) for v in b["colbert_vecs"])
    if max_length < 100:
        assert longest == max_length - 1  # texts longer than max_length were truncated
    else:
        assert longest < max_length - 1


def test_single_string_and_partial_outputs(flag_model, trine_model):
    a = flag_model.encode(TEXTS[3], return_dense=True, return_sparse=True, return_colbert_vecs=False)
    b = trine_model.encode(TEXTS[3], return_dense=True, return_sparse=True, return_colbert_vecs=False)
    assert b["colbert_vecs"] is None and a["colbert_vecs"] is None
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=1e-5)
    assert b["dense_vecs"].ndim == 1
    assert set(a["lexical_weights"]) == set(b["lexical_weights"])


def test_queries_with_instruction(tiny_m3_dir):
    instr, fmt = "Represent this sentence for searching relevant passages: ", "{}{}"
    f = FlagEmbedding.BGEM3FlagModel(tiny_m3_dir, use_fp16=False, devices="cpu",
                                     query_instruction_for_retrieval=instr, query_instruction_format=fmt)
    t = M3Embedder(tiny_m3_dir, show_progress=False, query_instruction_for_retrieval=instr,
                   query_instruction_format=fmt)
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    a, b = f.encode_queries(TEXTS, **kw), t.encode_queries(TEXTS, **kw)
    assert_same_encoding(a, b)
    plain = t.encode(TEXTS, **kw)
    assert not np.allclose(plain["dense_vecs"], b["dense_vecs"])  # the instruction was applied
    c, d = f.encode_corpus(TEXTS, **kw), t.encode_corpus(TEXTS, **kw)
    assert_same_encoding(c, d)


@pytest.mark.parametrize("weights", [None, [0.4, 0.2, 0.4]])
def test_compute_score_matches_flagembedding(flag_model, trine_model, weights):
    pairs = [(TEXTS[i], TEXTS[j]) for i in range(len(TEXTS)) for j in range(len(TEXTS))]
    kw = dict(batch_size=7, max_query_length=16, max_passage_length=48, weights_for_different_modes=weights)
    a = flag_model.compute_score(pairs, **kw)
    b = trine_model.compute_score(pairs, **kw)
    assert set(a) == set(b) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=1e-5, rtol=1e-5, err_msg=key)
    one_a = flag_model.compute_score(pairs[1], max_query_length=16, max_passage_length=48)
    one_b = trine_model.compute_score(pairs[1], max_query_length=16, max_passage_length=48)
    for key in one_a:
        assert abs(one_a[key] - one_b[key]) < 1e-5


def test_score_helpers_match(flag_model, trine_model):
    out = trine_model.encode(TEXTS, return_dense=False, return_sparse=True, return_colbert_vecs=True)
    lw, cv = out["lexical_weights"], out["colbert_vecs"]
    np.testing.assert_allclose(
        flag_model.compute_lexical_matching_score(lw, lw), trine_model.compute_lexical_matching_score(lw, lw),
        rtol=1e-6, atol=1e-6,
    )
    assert abs(flag_model.compute_lexical_matching_score(lw[0], lw[2])
               - trine_model.compute_lexical_matching_score(lw[0], lw[2])) < 1e-6
    for i, j in [(0, 1), (3, 5), (4, 4)]:
        expected = float(flag_model.colbert_score(cv[i], cv[j]))
        assert abs(expected - float(trine_model.colbert_score(cv[i], cv[j]))) < 1e-6
    assert flag_model.convert_id_to_token(lw) == trine_model.convert_id_to_token(lw)


def test_colbert_dim_differs_from_hidden(tmp_path, xlmr_tokenizer_dir):
    path = make_tiny_m3(str(tmp_path / "m3_c16"), xlmr_tokenizer_dir, seed=3, colbert_dim=16)
    f = FlagEmbedding.BGEM3FlagModel(path, use_fp16=False, devices="cpu", colbert_dim=16)
    t = M3Embedder(path, show_progress=False, colbert_dim=16)
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    a, b = f.encode(TEXTS, **kw), t.encode(TEXTS, **kw)
    assert b["colbert_vecs"][0].shape[1] == 16
    assert_same_encoding(a, b)


def test_round_trip_trine_saves_flagembedding_loads(tmp_path, tiny_m3_dir, trine_model):
    model = TriHeadModel.from_pretrained(tiny_m3_dir)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert (out / "colbert_linear.pt").exists() and (out / "sparse_linear.pt").exists()
    assert (out / "model.safetensors").exists()
    f = FlagEmbedding.BGEM3FlagModel(str(out), use_fp16=False, devices="cpu")
    kw = dict(max_length=64, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert_same_encoding(f.encode(TEXTS, **kw), trine_model.encode(TEXTS, **kw))
    reloaded = M3Embedder(str(out), show_progress=False)
    assert_same_encoding(reloaded.encode(TEXTS, **kw), trine_model.encode(TEXTS, **kw), atol=0)
