"""BM25 score distillation into the lexical head (``sparse_bm25_distill_weight``): the teacher's scores
against bm25s and a plain loop, the loss against kl_div written out, off by default and inert when off."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from test_finetune import common_args, write_data
from test_training_loss import GROUP, PASSAGES, QUERIES, no_dropout, tokenize

from trine import TriHeadModel
from trine.modeling.heads import lexical_matrix
from trine.modeling.lexical_init import BM25Teacher
from trine.training.arguments import EmbedderTrainingArguments
from trine.training.finetune import build_trainer, parse_args
from trine.training.losses import ScoreBatch, build_loss
from trine.training.model import EmbedderTrainingModel

K1, B = 1.5, 0.75


def terms(ids: torch.Tensor, skip: set[int]) -> list[list[int]]:
    """Each padded row's token ids other than special and padding ids, in order."""
    return [[int(t) for t in row if int(t) not in skip] for row in ids]


def hand_bm25(queries: list[list[int]], passages: list[list[int]], corpus: list[list[int]]) -> np.ndarray:
    """Lucene BM25 written out: corpus statistics from ``corpus``, each distinct query token once,
    divided by the largest weight (k1 + 1) idf(df=1)."""
    n = len(corpus)
    df = Counter(t for doc in corpus for t in set(doc))
    avgdl = sum(len(d) for d in corpus) / n
    largest = (K1 + 1) * math.log(1 + (n - 1 + 0.5) / 1.5)
    out = np.zeros((len(queries), len(passages)))
    for i, q in enumerate(queries):
        for j, p in enumerate(passages):
            tf = Counter(p)
            for t in set(q):
                if tf[t]:
                    idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                    out[i, j] += idf * tf[t] * (K1 + 1) / (tf[t] + K1 * (1 - B + B * len(p) / avgdl))
    return out / largest


@pytest.fixture(scope="module")
def encoder(tiny_m3_dir):
    model = TriHeadModel.from_pretrained(tiny_m3_dir)
    no_dropout(model.backbone)
    return model


def test_teacher_equals_bm25s_over_the_same_token_ids(encoder):
    """The teacher of a padded batch whose passages are the corpus equals bm25s (lucene, k1 1.5, b 0.75)
    indexing those passages' token ids as words, times (k1 + 1) / the largest weight."""
    bm25s = pytest.importorskip("bm25s")
    skip = set(encoder.unused_token_ids.tolist())
    q, p = tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES)
    teacher = BM25Teacher(terms(p["input_ids"], skip), encoder.vocab_size, sorted(skip))
    got = teacher(q["input_ids"], p["input_ids"])
    assert got.shape == (len(QUERIES), len(PASSAGES)) and got.dtype == torch.float32

    corpus = [[str(t) for t in doc] for doc in terms(p["input_ids"], skip)]
    index = bm25s.BM25(method="lucene", k1=K1, b=B)
    index.index(corpus, show_progress=False)
    want = np.stack([np.asarray(index.get_scores(sorted({str(t) for t in qt} & set(index.vocab_dict))))
                     for qt in terms(q["input_ids"], skip)])
    want = want * (K1 + 1) / teacher.scale
    assert (want > 0).sum() >= len(QUERIES)  # the batch shares tokens: the comparison means something
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_teacher_uses_corpus_statistics_not_the_batch(encoder):
    """Document frequencies and avgdl come from the training passages, not from the batch scored;
    a query token repeated counts once; padding and special tokens count nothing."""
    skip = set(encoder.unused_token_ids.tolist())
    corpus_texts = PASSAGES + ["memory memory memory and files", "a file of formatted text and memory"]
    corpus = terms(tokenize(encoder.tokenizer, corpus_texts)["input_ids"], skip)
    teacher = BM25Teacher(corpus, encoder.vocab_size, sorted(skip))
    queries = QUERIES + ["memory memory memory"]
    q = tokenize(encoder.tokenizer, queries)
    p = tokenize(encoder.tokenizer, PASSAGES[3:7] + corpus_texts[-2:])  # more padding than the corpus had
    got = teacher(q["input_ids"], p["input_ids"]).numpy()
    want = hand_bm25(terms(q["input_ids"], skip), terms(p["input_ids"], skip), corpus)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[-1].max() > 0


def test_distill_loss_is_kl_div_by_hand(encoder):
    """loss = the mode's loss + weight * (-mean_i sum_j softmax(bm25 / tau)_ij log softmax(s)_ij), over
    every in-batch column (sparse and unified), over each query's group without in-batch negatives."""
    skip = sorted(encoder.unused_token_ids.tolist())
    q, p = tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES)
    teacher = BM25Teacher(terms(p["input_ids"], set(skip)), encoder.vocab_size, skip)
    bm25 = teacher(q["input_ids"], p["input_ids"])
    for mode in ("sparse", "unified"):
        plain = EmbedderTrainingModel(encoder, temperature=0.05, training_mode=mode, use_self_distill=mode == "unified")
        taught = EmbedderTrainingModel(encoder, temperature=0.05, training_mode=mode,
                                       use_self_distill=mode == "unified", sparse_temperature=0.1,
                                       sparse_bm25_distill_weight=0.7, sparse_bm25_distill_temperature=0.2,
                                       bm25_teacher=teacher)
        reps_q, reps_p = plain.encode(q), plain.encode(p)
        q_mat = lexical_matrix(reps_q["token_weights"], reps_q["input_ids"], encoder.vocab_size)
        p_mat = lexical_matrix(reps_p["token_weights"], reps_p["input_ids"], encoder.vocab_size)
        student = q_mat @ p_mat.T / 0.1
        for in_batch in (True, False):
            s, t = student, bm25
            if not in_batch:
                cols = (torch.arange(len(QUERIES)) * GROUP).unsqueeze(1) + torch.arange(GROUP)
                s, t = student.gather(1, cols), bm25.gather(1, cols)
            hand = -(torch.softmax(t / 0.2, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
            plain.sparse_temperature = 0.1
            base = plain.loss_from_reps(reps_q, reps_p, in_batch_negatives=in_batch)
            out = taught.loss_from_reps(reps_q, reps_p, in_batch_negatives=in_batch)
            torch.testing.assert_close(out["parts"]["sparse_bm25_kd"], hand.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["loss"], base["loss"] + 0.7 * hand, atol=1e-5, rtol=1e-5)
            assert set(out["parts"]) - set(base["parts"]) == {"sparse_bm25_kd"}
            assert out["stats"].keys() == base["stats"].keys()  # the teacher's matrix is not logged as a stat
    # the loss object alone: kl_div of the tempered teacher
    loss = build_loss("bm25_distill", temperature=0.5)
    scores, t = torch.randn(3, 5), torch.rand(3, 5) * 4
    want = -(torch.softmax(t / 0.5, -1) * torch.log_softmax(scores, -1)).sum(-1).mean()
    torch.testing.assert_close(loss(ScoreBatch(scores, torch.zeros(3, dtype=torch.long), 1, bm25=t)), want)
    assert not loss.applies(ScoreBatch(scores, torch.zeros(3, dtype=torch.long), 1))


def test_off_by_default_and_unchanged_when_off(encoder, tmp_path, tiny_m3_dir):
    assert EmbedderTrainingArguments(output_dir=str(tmp_path)).sparse_bm25_distill_weight == 0.0
    q, p = tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES)
    default = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=True)
    off = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=True,
                                sparse_bm25_distill_weight=0.0)
    torch.manual_seed(0)
    a = default(q, p)
    torch.manual_seed(0)
    b = off(q, p)
    assert torch.equal(a["loss"], b["loss"]) and a["parts"].keys() == b["parts"].keys()
    assert "sparse_bm25_kd" not in a["parts"] and default.bm25_teacher is None
    data = write_data(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(tiny_m3_dir, data, tmp_path / "o", training_mode="unified")))
    assert trainer.model.bm25_teacher is None and trainer.model.sparse_bm25_distill_weight == 0.0


def test_training_run_logs_the_term_with_corpus_statistics(tmp_path, tiny_m3_dir):
    """Through `trine finetune`'s arguments: the teacher is built once over the training passages (every
    distinct positive and negative, truncated to passage_max_len) and its term is logged each step."""
    data = write_data(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(
        tiny_m3_dir, data, tmp_path / "o", max_steps=2, save_steps=100, training_mode="unified",
        use_self_distill=True, sparse_bm25_distill_weight=0.5)))
    teacher = trainer.model.bm25_teacher
    from test_finetune import PAGES

    assert teacher.n_docs == len({d for _, d in PAGES}) and trainer.model.bm25_distill.temperature == 0.05
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss_sparse_bm25_kd" in h]
    assert len(logged) == 2 and all(h["loss_sparse_bm25_kd"] > 0 for h in logged)


@pytest.mark.parametrize("options,match", [
    ({"sparse_bm25_distill_weight": -0.1}, "sparse_bm25_distill_weight must be a number >= 0"),
    ({"sparse_bm25_distill_weight": float("nan")}, "sparse_bm25_distill_weight must be a number >= 0"),
    ({"sparse_bm25_distill_weight": 0.5, "sparse_bm25_distill_temperature": 0.0}, "temperature must be a number > 0"),
    ({"sparse_bm25_distill_temperature": 0.1}, "needs sparse_bm25_distill_weight > 0"),
    ({"sparse_bm25_distill_weight": 0.5, "training_mode": "dense"}, "needs training_mode 'sparse' or 'unified'"),
    ({"sparse_bm25_distill_weight": 0.5, "training_mode": "colbert"}, "needs training_mode 'sparse' or 'unified'"),
])
def test_bad_values_raise(tmp_path, tiny_m3_dir, options, match):
    data = write_data(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match=match):
        parse_args(common_args(tiny_m3_dir, data, tmp_path / "o", **options))


def test_bad_model_options_raise(encoder):
    teacher = BM25Teacher([[5, 6, 7]], encoder.vocab_size)
    with pytest.raises(ValueError, match="needs a bm25_teacher"):
        EmbedderTrainingModel(encoder, training_mode="sparse", sparse_bm25_distill_weight=0.5)
    with pytest.raises(ValueError, match="nothing would use it"):
        EmbedderTrainingModel(encoder, training_mode="sparse", bm25_teacher=teacher)
    with pytest.raises(ValueError, match="needs the training passages"):
        BM25Teacher([], encoder.vocab_size)
    with pytest.raises(ValueError, match="no option"):
        build_loss("bm25_distill", temprature=1.0)
    with pytest.raises(ValueError, match="positive number"):
        build_loss("bm25_distill", temperature=-1.0)


def test_cross_device_teacher_covers_the_gathered_columns(tmp_path, tiny_m3_dir):
    """With negatives_cross_device the teacher scores every gathered passage (other ranks' too, each rank
    padded to its own length): two processes give the loss and gradients of one process with the whole batch."""
    import os

    import torch.multiprocessing as mp
    from test_training_m3 import _rank_run

    encoder = TriHeadModel.from_pretrained(tiny_m3_dir)
    no_dropout(encoder.backbone)
    skip = sorted(encoder.unused_token_ids.tolist())
    teacher = BM25Teacher(terms(tokenize(encoder.tokenizer, PASSAGES)["input_ids"], set(skip)),
                          encoder.vocab_size, skip)
    options = {"sparse_bm25_distill_weight": 0.5, "bm25_teacher": teacher}
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_run, args=(2, 29950 + os.getpid() % 40, tiny_m3_dir, out, True, options), nprocs=2, join=True)
    result = torch.load(out)
    model = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=True,
                                  **options).train()
    full = model(tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES))
    full["loss"].backward()
    assert "sparse_bm25_kd" in full["parts"]
    torch.testing.assert_close(result["loss"], full["loss"].detach(), atol=1e-5, rtol=1e-5)
    for name, prm in encoder.named_parameters():
        if prm.grad is not None:
            torch.testing.assert_close(result["grads"][name], prm.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_command_line_exit_2_on_a_bad_value(tmp_path, tiny_m3_dir, capsys):
    from trine.training.finetune import main

    data = write_data(tmp_path / "train.jsonl")
    assert main(common_args(tiny_m3_dir, data, tmp_path / "o", sparse_bm25_distill_weight=-1)) == 2
    err = capsys.readouterr().err
    assert "sparse_bm25_distill_weight must be a number >= 0, got -1.0" in err
    assert not (tmp_path / "o").exists()
