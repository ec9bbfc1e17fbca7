"""The ``bm25`` head start: a lexical head fitted to BM25 term weights before any training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import require, to_argv

from trine import M3Embedder, TriHeadModel
from trine.errors import OptionError
from trine.modeling.lexical_init import bm25_idf, bm25_targets, document_frequencies, fit_lexical_head

bm25s = require("bm25s")

COMMON = ["the", "file", "of", "a", "to", "and"]
# single word pieces in MiniLM's vocabulary
RARE = ["socket", "mount", "signal", "kernel", "daemon", "fork", "pipe", "cache", "thread", "buffer", "shell",
        "archive", "printer", "network", "password", "compiler", "driver", "terminal", "session"]


def toy_corpus(n: int = 80, seed: int = 0) -> list[str]:
    """Every text holds most common words and one or two rare ones: IDF orders them apart."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = rng.sample(COMMON, 5) + rng.sample(RARE, rng.choice((1, 2)))
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts


def test_targets_equal_bm25s_term_scores(minilm_dir):
    """sqrt-target^2 is the BM25 weight of the token in its text: bm25s's Lucene score of a one-term
    query on the same token lists, times (k1 + 1) (the classic numerator, a constant)."""
    tokenizer = TriHeadModel.from_pretrained(minilm_dir, with_heads=False).tokenizer
    texts = toy_corpus(30) + ["kernel kernel kernel signal", "the the file"]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    idf = bm25_idf(document_frequencies(ids, tokenizer.vocab_size), len(ids))
    targets = bm25_targets(ids, idf, k1=1.5, b=0.75)
    reference = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    reference.index([[str(t) for t in row] for row in ids], show_progress=False)
    for doc, (row, target) in enumerate(zip(ids, targets)):
        for token, value in zip(row, target):
            expected = reference.get_scores([str(token)])[doc] * 2.5
            assert value**2 == pytest.approx(expected, rel=1e-5)
    # a repeated token weighs more than once, less than three times (saturation)
    kernel = tokenizer.convert_tokens_to_ids("kernel")
    w_repeat = targets[-2][ids[-2].index(kernel)] ** 2
    assert idf[kernel] < w_repeat < 3 * idf[kernel] * 2.5


def test_special_tokens_get_no_target():
    ids = [[101, 5, 6, 102], [101, 5, 102]]
    idf = bm25_idf(document_frequencies(ids, 200, skip=[101, 102]), 2)
    targets = bm25_targets(ids, idf, skip=[101, 102])
    assert targets[0][0] == targets[0][3] == targets[1][2] == 0
    assert targets[0][2] > targets[0][1] > 0  # token 6 is in one text, token 5 in both


def test_fitted_head_reproduces_idf_ordering(minilm_dir):
    texts = toy_corpus()
    model = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="bm25", head_init_texts=texts,
                                         head_init_max_length=64)
    embedder = M3Embedder(model, show_progress=False, devices="cpu")
    weights = embedder.encode(texts, return_dense=False, return_sparse=True)["lexical_weights"]
    tok = model.tokenizer
    mean = {}
    for word in COMMON + RARE:
        key = str(tok.convert_tokens_to_ids(word))
        values = [w[key] for w in weights if key in w]
        mean[word] = float(np.mean(values)) if values else 0.0
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    idf = bm25_idf(document_frequencies(ids, tok.vocab_size), len(ids))
    # every rare word outweighs every common one, and weights follow IDF across all words
    assert min(mean[w] for w in RARE) > max(mean[w] for w in COMMON)
    order = [tok.convert_tokens_to_ids(w) for w in COMMON + RARE]
    rho = np.corrcoef(np.argsort(np.argsort([mean[w] for w in COMMON + RARE])),
                      np.argsort(np.argsort(idf[order])))[0, 1]
    assert rho > 0.7
    # the ColBERT head starts as 'neutral' (identity), the layout is unchanged
    assert torch.equal(model.colbert_linear.weight, torch.eye(model.hidden_size))
    assert model.sparse_linear.weight.shape == (1, model.hidden_size)


def test_fitted_lexical_scores_prefer_the_text_sharing_rare_words(minilm_dir):
    texts = toy_corpus()
    model = M3Embedder(minilm_dir, init_missing_heads="bm25", head_init_texts=texts, show_progress=False,
                       devices="cpu")
    docs = ["the file of a kernel daemon", "the file of a to and the file"]
    q = model.encode_queries(["kernel daemon file"], return_dense=False, return_sparse=True)["lexical_weights"][0]
    d = model.encode_corpus(docs, return_dense=False, return_sparse=True)["lexical_weights"]
    scores = [model.compute_lexical_matching_score(q, x) for x in d]
    assert scores[0] > scores[1] > 0


def test_fit_statistics_and_bad_input(minilm_dir):
    model = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="neutral")
    stats = fit_lexical_head(model, toy_corpus(), max_length=32, max_tokens=200)
    assert stats["texts"] == 80 and stats["tokens"] >= 200 and stats["encoded"] < 80
    assert 0 < stats["r2"] <= 1
    with pytest.raises(ValueError, match="at least 2"):
        fit_lexical_head(model, ["only one", "  "])
    with pytest.raises(OptionError, match="head_init_texts"):
        TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="bm25")
    with pytest.raises(OptionError, match="go with it only"):
        TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="neutral", head_init_texts=["a b", "c d"])
    with pytest.raises(OptionError, match="choose from"):
        TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="idf")


def test_finetune_fits_the_head_on_the_training_passages(tmp_path, minilm_dir):
    from trine.training.finetuning import build_trainer, parse_args

    data = tmp_path / "train.jsonl"
    texts = toy_corpus(24)
    with open(data, "w") as f:
        for i in range(0, 24, 2):
            f.write(json.dumps({"query": texts[i].split()[0], "pos": [texts[i]], "neg": [texts[i + 1]]}) + "\n")
    args = {"model_name_or_path": minilm_dir, "train_data": [str(data)], "output_dir": str(tmp_path / "o"),
            "training_mode": "unified", "init_missing_heads": "bm25", "train_group_size": 2,
            "per_device_train_batch_size": 2, "passage_max_len": 32, "max_steps": 1, "report_to": "none"}
    trainer = build_trainer(*parse_args(to_argv(args)))
    fitted = trainer.model.encoder.sparse_linear
    reference = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="bm25", head_init_texts=texts,
                                             head_init_max_length=32).sparse_linear
    assert torch.allclose(fitted.weight, reference.weight, atol=1e-5)
    assert torch.allclose(fitted.bias, reference.bias, atol=1e-5)


def test_quick_demo_with_the_fitted_head(capsys):
    """`trine demo --quick` (default heads: bm25, fitted on its six passages) ranks right in every mode."""
    from trine.demo import run_demo

    accuracy = run_demo()
    assert set(accuracy) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    assert accuracy["sparse"] >= 5 / 6 and accuracy["colbert+sparse+dense"] == 1.0
    assert "lexical weights of q0" in capsys.readouterr().out


def test_demo_checks_state_issue_15s_bar():
    from trine.demo import demo_checks

    metrics = {m: {"ndcg@10": v} for m, v in {"dense": 0.56, "sparse": 0.46, "colbert": 0.58, "sparse+dense": 0.58,
                                               "colbert+sparse+dense": 0.595, "bm25": 0.45, "dense+bm25": 0.59}.items()}
    checks = demo_checks(metrics)
    assert [holds for _, holds in checks] == [True, True, True, True]
    metrics["colbert+sparse+dense"]["ndcg@10"] = 0.589
    assert [holds for _, holds in demo_checks(metrics)] == [True, True, False, False]


def test_eval_bm25_heads_are_fitted_on_the_searched_corpus(minilm_dir):
    """`trine eval --heads bm25`: a folder without head files gets the lexical head fitted on the documents."""
    from trine.evaluation.runner import EvalConfig, load_embedder

    texts = toy_corpus(40)
    embedder = load_embedder(minilm_dir, EvalConfig(modes=("sparse",), k_values=(10,)),
                             {"init_missing_heads": "bm25", "show_progress": False}, corpus=texts)
    reference = TriHeadModel.from_pretrained(minilm_dir, init_missing_heads="bm25", head_init_texts=texts)
    assert torch.allclose(embedder.model.sparse_linear.weight, reference.sparse_linear.weight, atol=1e-5)
    with pytest.raises(ValueError, match="corpus"):
        load_embedder(minilm_dir, EvalConfig(modes=("sparse",), k_values=(10,)), {"init_missing_heads": "bm25"})
