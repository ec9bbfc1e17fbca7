"""`trine export`: sentence-transformers v6 folders (dense, sparse, multi-vector) and one ONNX graph
give trine's own encodings; bad input and unsafe outputs are clear errors (exit 2)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from trine.cli import main
from trine.errors import InputError, MissingInputError
from trine.export import OnnxM3Model, export_onnx, export_sentence_transformers
from trine.inference.embedder import Embedder, M3Embedder
from trine.inference.result import EncodeResult
from trine.modeling.trihead import TriHeadModel

# mixed lengths: shorter and (much) longer than the ONNX export's example batch (< 10 tokens)
TEXTS = [
    "ls",
    "How do I find files larger than 100 MB?",
    "grep searches the named input files for lines containing a match to the given patterns; by default it "
    "prints the matching lines. " * 8,
    "tar: an archiving utility",
    "rsync is a fast, versatile, remote (and local) file-copying tool that sends only the differences.",
]
ALL = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}


@pytest.fixture(scope="module")
def minilm_m3(minilm_dir, tmp_path_factory) -> str:
    """The real all-MiniLM-L6-v2 with heads (neutral, then perturbed so no weight is trivially 1)."""
    model = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="neutral")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.sparse_linear.weight.copy_(torch.randn(model.sparse_linear.weight.shape, generator=gen) * 0.05)
        model.colbert_linear.weight.add_(torch.randn(model.colbert_linear.weight.shape, generator=gen) * 0.02)
    out = str(tmp_path_factory.mktemp("minilm_m3") / "model")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(minilm_m3):
    return M3Embedder(minilm_m3, show_progress=False).encode(TEXTS, **ALL)


def sparse_row(weights: dict[str, float], vocab: int) -> np.ndarray:
    row = np.zeros(vocab, np.float32)
    for token, w in weights.items():
        row[int(token)] = w
    return row


def check_st_export(model_dir: str, out: str, ref, parts=("dense", "sparse", "multivector")) -> None:
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer, SparseEncoder

    written = export_sentence_transformers(model_dir, out, parts=parts)
    assert set(written) == set(parts)
    dense = SentenceTransformer(out, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(dense, ref["dense_vecs"], atol=1e-5)
    sparse_model = SparseEncoder(os.path.join(out, "sparse"), trust_remote_code=True, device="cpu")
    sparse = sparse_model.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    expected = np.stack([sparse_row(w, sparse.shape[1]) for w in ref["lexical_weights"]])
    assert all(ref["lexical_weights"]) and (expected > 0).sum() > 20
    np.testing.assert_allclose(sparse, expected, atol=1e-5)
    if "multivector" in parts:
        multi = MultiVectorEncoder(os.path.join(out, "multivector"), device="cpu")
        for encode in (multi.encode, multi.encode_query):
            for got, want in zip(encode(TEXTS), ref["colbert_vecs"]):
                got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, atol=1e-5)
    # the root is still a trine / FlagEmbedding folder giving the same vectors
    again = M3Embedder(out, show_progress=False).encode(TEXTS, **ALL)
    np.testing.assert_allclose(again["dense_vecs"], ref["dense_vecs"], atol=1e-6)


def test_sentence_transformers_export_matches_trine(minilm_m3, reference, tmp_path):
    check_st_export(minilm_m3, str(tmp_path / "st"), reference)


def test_sentence_transformers_export_xlmr_tokenizer(tiny_m3_dir, tmp_path):
    """XLM-R's special tokens (<s>, </s>, <pad>, <unk>) in the lexical weights, and cls pooling (the
    multi-vector part is checked on MiniLM: a 250k-token vocabulary makes each extra folder slow)."""
    ref = M3Embedder(tiny_m3_dir, show_progress=False).encode(TEXTS, **ALL)
    check_st_export(tiny_m3_dir, str(tmp_path / "st"), ref, parts=("dense", "sparse"))


def check_onnx(out: str | M3Embedder, ref, atol: float = 1e-4) -> None:
    # batches of different lengths
    runner = OnnxM3Model(out, show_progress=False, batch_size=2) if isinstance(out, str) else out
    got = runner.encode(TEXTS, **ALL)
    assert isinstance(got, EncodeResult)
    np.testing.assert_allclose(got["dense_vecs"], ref["dense_vecs"], atol=atol)
    for g, w in zip(got["lexical_weights"], ref["lexical_weights"]):
        assert set(g) == set(w)
        np.testing.assert_allclose([g[k] for k in w], list(w.values()), atol=atol)
    for g, w in zip(got["colbert_vecs"], ref["colbert_vecs"]):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol)
    one = runner.encode(TEXTS[1], **ALL)
    np.testing.assert_allclose(one["dense_vecs"], ref["dense_vecs"][1], atol=atol)
    assert one["colbert_vecs"].shape == ref["colbert_vecs"][1].shape


@pytest.fixture(scope="module")
def minilm_onnx(minilm_m3, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("minilm_onnx") / "onnx")
    return out, export_onnx(minilm_m3, out, quantize="int8", opset=17)


def test_onnx_export_matches_torch_and_int8(minilm_onnx, reference):
    out, recipe = minilm_onnx
    assert recipe["outputs"] == ["dense_vecs", "token_weights", "colbert_vecs", "colbert_mask"]
    with open(os.path.join(out, "trine_onnx.json")) as f:
        assert json.load(f)["int8_min_cosine"] == recipe["int8_min_cosine"]
    assert 0.9 < recipe["int8_min_cosine"] <= 1.0 + 1e-6
    check_onnx(out, reference)
    int8 = OnnxM3Model(out, model_file="model_int8.onnx", show_progress=False).encode(TEXTS)["dense_vecs"]
    assert np.min(np.sum(int8 * reference["dense_vecs"], 1) / np.linalg.norm(int8, axis=1)) > 0.85


def test_m3embedder_onnx_backend(minilm_m3, minilm_onnx, reference):
    """backend="onnx": the same tokenising, batching and EncodeResult as torch; only the model call differs."""
    out = minilm_onnx[0]
    onnx = M3Embedder(out, backend="onnx", show_progress=False, batch_size=2)
    check_onnx(onnx, reference)
    torch_model = M3Embedder(minilm_m3, show_progress=False)
    pairs = [(TEXTS[1], TEXTS[2]), (TEXTS[3], TEXTS[4]), (TEXTS[0], TEXTS[2])]
    got, want = onnx.compute_score(pairs), torch_model.compute_score(pairs)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4)
    dense = Embedder(out, backend="onnx", show_progress=False)
    assert dense.outputs == ("dense",)
    np.testing.assert_allclose(dense.encode(TEXTS), reference["dense_vecs"], atol=1e-4)
    for option in ({"use_fp16": True}, {"use_bf16": True}, {"mcls_interval": 8}, {"devices": "cuda:0"},
                   {"devices": ["cpu", "cpu"]}, {"pooling_method": "mean"}, {"init_missing_heads": "neutral"}):
        with pytest.raises(ValueError, match=f"{next(iter(option))}.*backend='onnx'"):
            M3Embedder(out, backend="onnx", **option)
    with pytest.raises(ValueError, match="TriHeadModel"):
        M3Embedder(torch_model.model, backend="onnx")
    with pytest.raises(MissingInputError, match=re.escape(minilm_m3)):
        M3Embedder(minilm_m3, backend="onnx")
    with pytest.raises(ValueError, match="backend"):
        M3Embedder(out, backend="tensorrt")


def test_dense_only_folder(minilm_dir, tmp_path, capsys):
    """A folder without heads: dense exports work; asking for lexical/ColBERT output is a clear error."""
    from sentence_transformers import SentenceTransformer

    out = str(tmp_path / "dense")
    assert export_sentence_transformers(minilm_dir, out) == {"dense": out}
    assert not os.path.exists(os.path.join(out, "sparse"))
    SentenceTransformer(out, device="cpu")
    with pytest.raises(InputError, match="no BGE-M3 head files"):
        export_sentence_transformers(minilm_dir, str(tmp_path / "x"), parts=("dense", "sparse"))
    assert main(["export", minilm_dir, str(tmp_path / "y"), "--to", "sentence-transformers",
                 "--parts", "dense,sparse"]) == 2
    assert "no BGE-M3 head files" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "y")
    onnx_out = str(tmp_path / "onnx")
    assert export_onnx(minilm_dir, onnx_out)["outputs"] == ["dense_vecs"]
    runner = OnnxM3Model(onnx_out, show_progress=False)
    with pytest.raises(ValueError, match="dense only"):
        runner.encode(TEXTS, return_sparse=True)
    from trine.inference.encoder import Encoder

    want = Encoder(minilm_dir, with_heads=False, show_progress=False).encode_result(TEXTS)["dense_vecs"]
    np.testing.assert_allclose(runner.encode(TEXTS)["dense_vecs"], want, atol=1e-4)


def test_output_policy_and_xlmr_onnx(tiny_m3_dir, tmp_path, capsys):
    assert main(["export", tiny_m3_dir, tiny_m3_dir, "--to", "onnx"]) == 2  # never replaces its input
    assert "replace the input" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", tiny_m3_dir, str(foreign), "--to", "sentence-transformers"]) == 2
    assert os.listdir(foreign) == ["notes.txt"]
    out = str(tmp_path / "st")
    assert main(["export", tiny_m3_dir, out, "--to", "sentence-transformers", "--parts", "dense"]) == 0
    assert main(["export", tiny_m3_dir, out, "--to", "sentence-transformers", "--parts", "dense"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", tiny_m3_dir, out, "--to", "onnx", "--overwrite"]) == 0
    assert os.path.exists(os.path.join(out, "model.onnx")) and not os.path.exists(os.path.join(out, "modules.json"))
    # XLM-R's special tokens (<s>, </s>, <pad>, <unk>) and cls pooling through the ONNX graph
    check_onnx(out, M3Embedder(tiny_m3_dir, show_progress=False).encode(TEXTS, **ALL))
    assert main(["export", tiny_m3_dir, str(tmp_path / "z"), "--to", "onnx", "--parts", "dense"]) == 2
    assert main(["export", tiny_m3_dir, str(tmp_path / "z"), "--to", "onnx", "--quantize", "int4"]) == 2
    assert main(["export", tiny_m3_dir, str(tmp_path / "z"), "--to", "onnx", "--opset", "7"]) == 2
    assert not os.path.exists(tmp_path / "z")


def test_onnx_embedder_has_a_cache_fingerprint(minilm_onnx):
    """The embedding cache keys an ONNX-backed embedder by its graph: same graph, same key."""
    from trine import M3Embedder
    from trine.curation.cache import model_fingerprint

    out, _ = minilm_onnx
    first = M3Embedder(out, backend="onnx", show_progress=False)
    second = M3Embedder(out, backend="onnx", show_progress=False)
    assert model_fingerprint(first.model) == model_fingerprint(second.model)
