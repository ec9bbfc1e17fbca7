"""`trine score`: teacher scores equal the teacher's own computation on the same pairs; outputs validate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import require, unavailable

from trine import Embedder, M3Embedder
from trine.cli import main
from trine.curation.teacher import M3_MODES, EmbedderScorer, RerankerScorer, add_teacher_scores
from trine.datasets.manpages import load_manpages
from trine.training.data import DataError, load_train_files


@pytest.fixture(scope="module")
def pages():
    try:
        return load_manpages(update_package_lists=True)[:40]
    except RuntimeError as err:
        unavailable(f"man pages unavailable: {err}")


def write(path, pages, negatives=2):
    """Records with real text: a page's NAME line, its DESCRIPTION, and the next pages' DESCRIPTIONs as negatives."""
    with open(path, "w") as f:
        for i, p in enumerate(pages):
            negs = [pages[(i + k) % len(pages)].description for k in range(1, negatives + 1)]
            f.write(json.dumps({"query": p.name, "pos": [p.description], "neg": negs, "prompt": "x"}) + "\n")
    return str(path)


def test_dense_teacher_scores_equal_the_embedder(tmp_path, minilm_dir, pages):
    src = write(tmp_path / "train.jsonl", pages)
    out = str(tmp_path / "scored.jsonl")
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=96, query_max_length=32)
    encoded: list[int] = []
    original = emb.encode_result  # what the scorer calls: queries (kind="query"), then passages

    def spy(texts, *a, **k):
        encoded.append(len(texts))
        return original(texts, *a, **k)

    emb.encode_result = spy
    summary = add_teacher_scores(src, out, EmbedderScorer(emb), chunk_size=15, show_progress=False)
    rows = [json.loads(line) for line in open(out)]
    # each distinct text encoded once per chunk: the chunk's queries, then its distinct passages
    expected = []
    for c in range(0, 40, 15):
        chunk = rows[c : c + 15]
        expected += [len({r["query"] for r in chunk}), len({t for r in chunk for t in r["pos"] + r["neg"]})]
    assert encoded == expected and summary.pairs == 40 * 3
    emb2 = Embedder(minilm_dir, show_progress=False, passage_max_length=96, query_max_length=32)
    q = emb2.encode_queries([r["query"] for r in rows])
    texts = list(dict.fromkeys(t for r in rows for t in r["pos"] + r["neg"]))
    p = dict(zip(texts, emb2.encode_corpus(texts)))
    for r, qv in zip(rows, q):
        expect = [float(p[t] @ qv) for t in r["pos"] + r["neg"]]
        np.testing.assert_allclose(r["pos_scores"] + r["neg_scores"], expect, rtol=1e-5, atol=1e-5)
        assert r["prompt"] == "x"  # other fields kept
    files = load_train_files([out], train_group_size=3, knowledge_distillation=True)
    assert len(files[0].records) == 40


def test_m3_modes_equal_compute_score(tiny_m3_dir, pages):
    emb = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=64, query_max_length=24)
    pairs = [(p.name, q.description) for p in pages[:6] for q in pages[:4]]
    weights = [0.4, 0.2, 0.4]
    reference = emb.compute_score(pairs, weights_for_different_modes=weights)
    for mode in M3_MODES:
        scores = EmbedderScorer(emb, mode, weights)([a for a, _ in pairs], [b for _, b in pairs])
        np.testing.assert_allclose(scores, reference[mode], rtol=1e-5, atol=1e-5, err_msg=mode)
    with pytest.raises(ValueError, match="not available"):
        EmbedderScorer(Embedder(tiny_m3_dir, show_progress=False), "sparse")
    with pytest.raises(ValueError, match="dense, sparse, colbert"):
        EmbedderScorer(emb, "colbert+sparse+dense", [1, 1])


def make_tiny_cross_encoder(out_dir: str, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=1, initializer_range=0.3)
    BertForSequenceClassification(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_cross_encoder_teacher(tmp_path, minilm_dir, pages, capsys):
    reranker_mod = require("trine.inference.reranker")
    ce_dir = make_tiny_cross_encoder(str(tmp_path / "ce"), minilm_dir)
    src = write(tmp_path / "train.jsonl", pages[:12])
    out = tmp_path / "scored.jsonl"
    code = main(["score", "--input_file", src, "--output_file", str(out), "--reranker", ce_dir,
                 "--reranker_max_len", "64", "--chunk_size", "5", "--quiet"])
    assert code == 0 and "positive scores" in capsys.readouterr().out
    rr = reranker_mod.Reranker(ce_dir, show_progress=False, max_length=64)
    for r in map(json.loads, open(out)):
        expect = rr.compute_score([(r["query"], p) for p in r["pos"] + r["neg"]])
        np.testing.assert_allclose(r["pos_scores"] + r["neg_scores"], expect, rtol=1e-5, atol=1e-5)
    load_train_files([str(out)], train_group_size=3, knowledge_distillation=True)

    class Fake:  # any object with compute_score plugs in; duplicate pairs are scored once
        calls: list[int] = []

        def compute_score(self, pairs, **kwargs):
            self.calls.append(len(pairs))
            return [float(len(q) - len(p)) for q, p in pairs]

    fake = Fake()
    got = RerankerScorer(fake, batch_size=4)(["a", "a", "bb"], ["x", "x", "y"])
    assert got.tolist() == [0.0, 0.0, 1.0] and fake.calls == [2]


def test_bad_input_and_overwrite(tmp_path, minilm_dir, pages, capsys):
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q2", "pos": "not a list"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: pos: must be a list"):
        add_teacher_scores(str(bad), str(tmp_path / "o.jsonl"), EmbedderScorer(emb))
    assert not (tmp_path / "o.jsonl").exists()
    src = write(tmp_path / "train.jsonl", pages[:3])
    with pytest.raises(ValueError, match="replace the input"):
        add_teacher_scores(src, src, EmbedderScorer(emb))
    assert main(["score", "--input_file", str(bad), "--output_file", str(tmp_path / "o.jsonl"),
                 "--model_name_or_path", minilm_dir, "--quiet"]) == 2
    assert "bad.jsonl:2: pos" in capsys.readouterr().err


def test_cli_m3_teacher_mode(tmp_path, tiny_m3_dir, pages, capsys):
    src = write(tmp_path / "train.jsonl", pages[:8], negatives=1)
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--input_file", src, "--output_file", str(out), "--model_name_or_path", tiny_m3_dir,
                 "--score_mode", "colbert+sparse+dense", "--weights", "0.4,0.2,0.4", "--passage_max_len", "64",
                 "--query_max_len", "24", "--quiet"]) == 0
    rows = [json.loads(line) for line in open(out)]
    emb = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=64, query_max_length=24)
    pairs = [(r["query"], p) for r in rows for p in r["pos"] + r["neg"]]
    expect = emb.compute_score(pairs, weights_for_different_modes=[0.4, 0.2, 0.4])["colbert+sparse+dense"]
    np.testing.assert_allclose([x for r in rows for x in r["pos_scores"] + r["neg_scores"]], expect, rtol=1e-5,
                               atol=1e-5)
    capsys.readouterr()
    assert main(["score", "--input_file", src, "--output_file", str(tmp_path / "x.jsonl")]) == 2
    assert "a teacher is needed" in capsys.readouterr().err
