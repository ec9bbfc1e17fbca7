"""The tri-head model: heads, pooling, MCLS, loading rules and atomic saving."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from conftest import TEXTS, require

from trine import M3Embedder, TriHeadModel
from trine.inference.batching import insert_mcls, mcls_content_budget, tokenize
from trine.modeling import lexical_matrix, pool


def test_lexical_matrix_equals_brute_force_and_backpropagates():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 17))
    w = torch.rand(3, 17, requires_grad=True)
    got = lexical_matrix(w, ids, 50)
    dense = torch.zeros(3, 17, 50).scatter(-1, ids.unsqueeze(-1), w.unsqueeze(-1)).max(1).values
    torch.testing.assert_close(got, dense)
    got.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_lexical_matrix_never_allocates_batch_by_length_by_vocab():
    batch, length, vocab = 8, 256, 250002
    ids = torch.randint(0, vocab, (batch, length))
    w = torch.rand(batch, length)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        lexical_matrix(w, ids, vocab)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest <= batch * vocab * 4 * 1.01  # one (batch x vocab) float tensor, not x length


def test_pooling_methods():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(pool(h, mask, "last_token"), torch.stack([h[0, 3], h[1, 1]]))
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(pool(h, left, "last_token"), h[:, -1])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(h, mask, "max")


def test_special_tokens_carry_no_lexical_weight(tiny_m3_dir):
    model = M3Embedder(tiny_m3_dir, show_progress=False)
    tok = model.tokenizer
    out = model.encode(TEXTS + ["<unk> " + TEXTS[0]], return_dense=False, return_sparse=True)
    special = {str(i) for i in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)}
    for lw in out["lexical_weights"]:
        assert lw and not (set(lw) & special)
        assert all(w > 0 for w in lw.values())


def test_missing_heads_raise_unless_asked(minilm_dir, caplog):
    with pytest.raises(FileNotFoundError, match="init_missing_heads"):
        TriHeadModel.from_pretrained(minilm_dir)
    with caplog.at_level(logging.WARNING):
        m = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="random")
    assert "NEW random" in caplog.text
    assert m.has_heads
    dense_only = TriHeadModel.from_pretrained(minilm_dir, with_heads=False)
    assert not dense_only.has_heads
    with pytest.raises(ValueError, match="without heads"):
        dense_only(torch.tensor([[101, 102]]), torch.tensor([[1, 1]]), return_sparse=True)


def test_one_head_file_alone_is_refused(tmp_path, tiny_m3_dir):
    model = TriHeadModel.from_pretrained(tiny_m3_dir)
    model.save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "sparse_linear.pt")
    with pytest.raises(FileNotFoundError, match="refusing to mix"):
        TriHeadModel.from_pretrained(tmp_path / "m", init_missing_heads="random")


def test_neutral_heads(minilm_dir):
    m = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="neutral")
    torch.testing.assert_close(m.colbert_linear.weight, torch.eye(m.hidden_size))
    assert float(m.sparse_linear.bias.detach()) == 1.0
    with pytest.raises(ValueError, match="square"):
        TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="neutral", colbert_dim=64)


def test_save_is_atomic(tmp_path, tiny_m3_dir, monkeypatch):
    model = TriHeadModel.from_pretrained(tiny_m3_dir)
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = sorted(os.listdir(target))
    with torch.no_grad():
        model.sparse_linear.bias.add_(1.0)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == before  # the old checkpoint is intact
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp folder left
    reloaded = TriHeadModel.from_pretrained(target)
    assert not torch.equal(reloaded.sparse_linear.bias, model.sparse_linear.bias)
    model.save_pretrained(target, overwrite=True)  # overwriting works
    reloaded = TriHeadModel.from_pretrained(target)
    torch.testing.assert_close(reloaded.sparse_linear.bias, model.sparse_linear.bias)


def test_mcls_insertion():
    ids = [0] + list(range(10, 30)) + [2]
    out = insert_mcls(ids, 0, 8, 512)
    assert out == [0, *range(10, 18), 0, *range(18, 26), 0, *range(26, 30), 2]
    short = insert_mcls(ids, 0, 8, 12)
    assert len(short) <= 12 and short[0] == 0 and short[-1] == 2
    assert short == [0, *range(10, 18), 0, 18, 2]
    for max_length in range(4, 80):
        for interval in (1, 3, 8, 256):
            c = mcls_content_budget(max_length, interval)
            assert c + -(-c // interval) + 1 <= max_length
            assert (c + 1) + -(-(c + 1) // interval) + 1 > max_length


def test_mcls_dense_is_mean_of_cls_states(tiny_m3_dir):
    long_text = " ".join(TEXTS)
    emb = M3Embedder(tiny_m3_dir, show_progress=False, mcls_interval=16, normalize_embeddings=False)
    out = emb.encode([long_text, TEXTS[0]], max_length=128, return_dense=True, return_colbert_vecs=True)
    ids = tokenize(emb.tokenizer, [long_text], 128, 16)[0]
    cls_pos = [i for i, t in enumerate(ids) if t == emb.tokenizer.cls_token_id]
    assert len(ids) == 128 and len(cls_pos) > 1
    with torch.no_grad():
        h = emb.model.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
    np.testing.assert_allclose(out["dense_vecs"][0], h[cls_pos].mean(0).numpy(), atol=1e-5)
    assert out["colbert_vecs"][0].shape[0] == len(ids) - len(cls_pos)  # inserted CLS carry no multi-vector
    plain = M3Embedder(tiny_m3_dir, show_progress=False, normalize_embeddings=False)
    short_plain = plain.encode(TEXTS[0], return_dense=True)["dense_vecs"]
    np.testing.assert_allclose(out["dense_vecs"][1], short_plain, atol=1e-5)  # short text: one CLS, as before


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_folder_keeps_pooling_and_loads_in_sentence_transformers(tmp_path, minilm_dir, pooling):
    st = require("sentence_transformers")
    from trine import Embedder

    model = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="neutral", pooling_method=pooling)
    model.save_pretrained(tmp_path / "saved")
    reloaded = TriHeadModel.from_pretrained(tmp_path / "saved")
    assert reloaded.pooling_method == pooling  # no silent fallback to another pooling
    ours = Embedder(str(tmp_path / "saved"), show_progress=False).encode(TEXTS)
    theirs = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_attention_implementation_is_passed_through(splade_tiny_dir):
    m = TriHeadModel.from_pretrained(splade_tiny_dir, with_heads=False, attn_implementation="eager")
    assert m.backbone.config._attn_implementation == "eager"
