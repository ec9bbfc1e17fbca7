"""Reranker inference: parity with FlagEmbedding's FlagReranker on tiny random checkpoints
(BERT with token types, XLM-R without), pair assembly, loading rules."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import TEXTS, make_tiny_reranker, require

from trine.inference.reranker import Reranker
from trine.modeling.cross_encoder import CrossEncoder, PairTemplate

FlagEmbedding = require("FlagEmbedding")

QUERIES = ["how do I change file permissions", "creation of the world", "malloc", "formatted output in C"]


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def tiny_reranker_dir(request, tmp_path_factory, minilm_dir, xlmr_tokenizer_dir):
    tok = minilm_dir if request.param == "bert" else xlmr_tokenizer_dir
    return make_tiny_reranker(str(tmp_path_factory.mktemp(f"rr_{request.param}")), tok, request.param)


def all_pairs() -> list[tuple[str, str]]:
    return [(q, t) for q in QUERIES for t in TEXTS] + [(TEXTS[5], TEXTS[3])]  # a query longer than its budget


@pytest.mark.parametrize("max_length,query_max_length,batch_size", [(512, None, 7), (48, None, 256), (40, 8, 3)])
def test_compute_score_matches_flag_reranker(tiny_reranker_dir, max_length, query_max_length, batch_size):
    pairs = all_pairs()
    flag = FlagEmbedding.FlagReranker(tiny_reranker_dir, use_fp16=False, devices="cpu")
    ours = Reranker(tiny_reranker_dir, devices="cpu", show_progress=False)
    kw = dict(batch_size=batch_size, max_length=max_length, query_max_length=query_max_length)
    a = np.array(flag.compute_score(pairs, **kw))
    b = np.array(ours.compute_score(pairs, **kw))
    assert a.shape == b.shape == (len(pairs),)
    assert np.std(b) > 1e-2  # the random model does tell pairs apart
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    a_norm = np.array(flag.compute_score(pairs, normalize=True, **kw))
    b_norm = np.array(ours.compute_score(pairs, normalize=True, **kw))
    np.testing.assert_allclose(b_norm, a_norm, atol=1e-6, rtol=0)
    assert ((b_norm > 0) & (b_norm < 1)).all()


def test_instructions_and_single_pair_match(tiny_reranker_dir):
    kw = dict(query_instruction_for_rerank="Query: ", passage_instruction_for_rerank="Passage: ",
              passage_instruction_format="{}{}")
    flag = FlagEmbedding.FlagReranker(tiny_reranker_dir, use_fp16=False, devices="cpu", **kw)
    ours = Reranker(tiny_reranker_dir, devices="cpu", show_progress=False, **kw)
    pairs = all_pairs()[:9]
    np.testing.assert_allclose(ours.compute_score(pairs), flag.compute_score(pairs), atol=1e-5, rtol=0)
    single = ours.compute_score(pairs[2])
    assert isinstance(single, list) and len(single) == 1
    np.testing.assert_allclose(single, flag.compute_score(pairs[2]), atol=1e-5)
    plain = Reranker(tiny_reranker_dir, devices="cpu", show_progress=False)
    assert abs(plain.compute_score(pairs[2])[0] - single[0]) > 1e-6  # the instruction reached the model


def test_pair_template_matches_tokenizer(minilm_dir, xlmr_tokenizer_dir):
    from transformers import AutoTokenizer

    for path in (minilm_dir, xlmr_tokenizer_dir):
        tok = AutoTokenizer.from_pretrained(path)
        template = PairTemplate.from_tokenizer(tok)
        for q, p in [(QUERIES[0], TEXTS[1]), (TEXTS[2], TEXTS[6])]:
            qi = tok(q, add_special_tokens=False)["input_ids"]
            pi = tok(p, add_special_tokens=False)["input_ids"]
            ids, types = template.build(qi, pi, 512)
            ref = tok(q, p, return_token_type_ids=True)
            assert ids == ref["input_ids"]
            assert types == ref["token_type_ids"]
            ids, _ = template.build(qi, pi, len(qi) + template.num_special + 3)
            assert len(ids) == len(qi) + template.num_special + 3  # only the passage was cut
    with pytest.raises(ValueError, match="no room"):
        template.build(list(range(20)), [5], 20)


def test_batch_composition_does_not_change_scores(tiny_reranker_dir):
    ours = Reranker(tiny_reranker_dir, devices="cpu", show_progress=False, max_tokens_per_batch=None)
    pairs = all_pairs()
    together = ours.compute_score(pairs, batch_size=64)
    alone = [ours.compute_score(p, batch_size=1)[0] for p in pairs[:6]]
    np.testing.assert_allclose(together[:6], alone, atol=1e-5)
    budget = Reranker(tiny_reranker_dir, devices="cpu", show_progress=False, max_tokens_per_batch=64)
    np.testing.assert_allclose(budget.compute_score(pairs), together, atol=1e-5)


def test_loading_rules(tmp_path, minilm_dir, tiny_reranker_dir):
    with pytest.raises(ValueError, match="not a trained reranker"):
        Reranker(minilm_dir, devices="cpu")  # a plain backbone: no classifier weights
    ce = CrossEncoder.from_pretrained(minilm_dir, new_classifier=True)
    assert ce.model.config.num_labels == 1
    with pytest.raises(FileNotFoundError):
        CrossEncoder.from_pretrained(str(tmp_path / "missing"))
    # save -> FlagEmbedding loads it and agrees
    model = CrossEncoder.from_pretrained(tiny_reranker_dir)
    out = str(tmp_path / "saved")
    model.save_pretrained(out)
    assert os.path.exists(os.path.join(out, "config.json"))
    pairs = all_pairs()[:5]
    flag = FlagEmbedding.FlagReranker(out, use_fp16=False, devices="cpu")
    np.testing.assert_allclose(Reranker(out, devices="cpu", show_progress=False).compute_score(pairs),
                               flag.compute_score(pairs), atol=1e-5)
    with pytest.raises(TypeError, match="pair"):
        Reranker(out, devices="cpu").compute_score([("a", "b"), ("c",)])
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        Reranker(out, devices="cpu", max_tokens_per_batch=0)


def test_rerank_orders_best_first(tiny_reranker_dir):
    ours = Reranker(tiny_reranker_dir, devices="cpu", show_progress=False)
    ranked = ours.rerank(QUERIES[0], TEXTS, top_k=3)
    scores = ours.compute_score([(QUERIES[0], t) for t in TEXTS])
    assert [i for i, _ in ranked] == list(np.argsort(-np.array(scores))[:3])


@pytest.mark.gpu
def test_fp16_on_gpu_close_to_fp32(tiny_reranker_dir):
    pairs = all_pairs()
    a = Reranker(tiny_reranker_dir, devices="cuda:0", show_progress=False).compute_score(pairs)
    b = Reranker(tiny_reranker_dir, devices="cuda:0", use_fp16=True, show_progress=False).compute_score(pairs)
    np.testing.assert_allclose(a, b, atol=5e-2)


def test_eval_rerank_stage_reorders_the_dense_top_k(tmp_path, splade_tiny_dir, minilm_dir, capsys):
    """`trine eval --reranker`: rerank(dense) is the dense top-k ordered by the cross-encoder's own
    scores, and its metrics are pytrec_eval's on that ranking."""
    import pytrec_eval
    from test_evaluation import fake_pages

    from trine.cli import main
    from trine.evaluation import EvalConfig, load_dataset, run_evaluation
    from trine.evaluation.manpages import build_manpages_beir
    from trine.inference.embedder import M3Embedder

    data = tmp_path / "data"
    build_manpages_beir(data, pages=fake_pages(60), seed=0)
    dataset = load_dataset(str(data), "test")
    rr_dir = make_tiny_reranker(str(tmp_path / "rr"), minilm_dir, "bert", seed=5)
    reranker = Reranker(rr_dir, devices="cpu", show_progress=False)
    model = M3Embedder(splade_tiny_dir, init_missing_heads="neutral", show_progress=False, devices="cpu")
    config = EvalConfig(modes=("dense", "sparse"), k_values=(1, 10), top_k=20, rerank_modes=("dense",),
                        reranker_top_k=15, reranker_max_length=96)
    result = run_evaluation([model], dataset, config, reranker=reranker, return_runs=True)
    metrics = result["models"]["M3Embedder#1"]["metrics"]
    assert list(metrics) == ["dense", "sparse", "rerank(dense)"]

    ids, texts = dataset.passages()
    qids = list(dataset.queries)
    d = model.encode(texts, max_length=512)["dense_vecs"]
    q = model.encode([dataset.queries[x] for x in qids], max_length=64)["dense_vecs"]
    col = {doc: j for j, doc in enumerate(ids)}
    run = {}
    for i, qid in enumerate(qids):
        # the dense top-15 the reranker saw, checked to be a top-15 by score (ties may be ordered
        # differently by FAISS and numpy, so positions are not compared), then scored here
        sims = q[i] @ d.T
        top = [col[doc] for doc in list(result["models"]["M3Embedder#1"]["runs"]["dense"][qid])[:15]]
        assert np.delete(sims, top).max() <= sims[top].min() + 1e-5
        scores = reranker.compute_score([(dataset.queries[qid], texts[j]) for j in top], max_length=96)
        run[qid] = {ids[j]: float(s) for j, s in zip(top, scores)}
    ref = pytrec_eval.RelevanceEvaluator(dataset.qrels, {"ndcg_cut.10"}).evaluate(run)
    assert metrics["rerank(dense)"]["ndcg@10"] == pytest.approx(np.mean([ref[x]["ndcg_cut_10"] for x in qids]),
                                                                abs=1e-6)
    assert metrics["rerank(dense)"]["ndcg@10"] != metrics["dense"]["ndcg@10"]  # the random reranker reorders

    with pytest.raises(ValueError, match="no reranker"):
        run_evaluation([model], dataset, config)
    with pytest.raises(ValueError, match="rerank_modes"):
        EvalConfig(modes=("dense",), rerank_modes=("sparse",))
    rc = main(["eval", "--data", str(data), "--model", splade_tiny_dir, "--heads", "neutral", "--quiet",
               "--modes", "dense", "--k", "1,10", "--top-k", "20", "--reranker", rr_dir, "--reranker-top-k", "20"])
    assert rc == 0

    # a reranker of 128 positions: the default length is its 128, a longer one asked is refused before encoding
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    short = str(tmp_path / "rr128")
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64, num_labels=1,
                                             max_position_embeddings=128)).save_pretrained(short)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(short)
    argv = ["eval", "--data", str(data), "--model", splade_tiny_dir, "--heads", "neutral", "--quiet", "--modes",
            "dense", "--k", "1,10", "--top-k", "20", "--reranker", short, "--reranker-top-k", "10"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--reranker-max-length", "512"]) == 2
    err = capsys.readouterr().err
    assert "512 is more than the reranker's 128 positions" in err and "Traceback" not in err


def test_eval_dense_only_needs_no_heads(tmp_path, minilm_dir, capsys):
    from test_evaluation import fake_pages

    from trine.cli import main
    from trine.evaluation.manpages import build_manpages_beir

    data = tmp_path / "data"
    build_manpages_beir(data, pages=fake_pages(30), seed=0)
    args = ["eval", "--data", str(data), "--model", minilm_dir, "--quiet", "--k", "1,10", "--top-k", "10"]
    assert main(args + ["--modes", "dense"]) == 0
    assert main(args + ["--modes", "dense,sparse"]) == 2  # a folder without head files: named, no traceback
    assert "--heads" in capsys.readouterr().err
