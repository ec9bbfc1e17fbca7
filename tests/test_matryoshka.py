"""Matryoshka embeddings: the training loss over truncated, re-normalised dense vectors (parity with
FlagEmbedding's ``use_mrl``), ``truncate_dim`` at inference, and ``trine eval --dims``."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import end_rank, require, to_argv
from test_training_loss import GROUP, PASSAGES, QUERIES, no_dropout, tokenize

from trine import TriHeadModel
from trine.training.gradcache import gradcache_step
from trine.training.model import EmbedderTrainingModel, check_matryoshka

TEACHER = torch.tensor([[3.0, 1.0, 0.5], [2.0, 2.5, 0.0], [1.0, 0.0, -1.0], [0.2, 0.1, 0.3]])


def dense_model(model_dir, **kw):
    encoder = TriHeadModel.from_pretrained(model_dir, with_heads=False, pooling_method="cls")
    no_dropout(encoder.backbone)
    return EmbedderTrainingModel(encoder, temperature=0.05, **kw).train()


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------- training loss
@pytest.mark.parametrize("in_batch", [True, False])
def test_full_size_dimension_equals_the_plain_loss_exactly(splade_tiny_dir, in_batch):
    plain = dense_model(splade_tiny_dir)
    mrl = EmbedderTrainingModel(plain.encoder, temperature=0.05, matryoshka_dims=[128]).train()
    q, p = (plain.encode(tokenize(plain.encoder.tokenizer, t)) for t in (QUERIES, PASSAGES))
    want = plain.loss_from_reps(q, p, TEACHER, in_batch)
    got = mrl.loss_from_reps(q, p, TEACHER, in_batch)
    assert torch.equal(got["loss"], want["loss"])
    assert set(got["parts"]) == {"ce@128", "kd@128"}


def test_weighted_sum_of_truncated_renormalised_losses(splade_tiny_dir):
    model = dense_model(splade_tiny_dir, matryoshka_dims=[64, 16], matryoshka_weights=[1.0, 0.5])
    q, p = (model.encode(tokenize(model.encoder.tokenizer, t)) for t in (QUERIES, PASSAGES))
    targets = torch.arange(len(QUERIES)) * GROUP

    def ce(dim):
        qd = torch.nn.functional.normalize(q["dense_vecs"][:, :dim], dim=-1)
        pd = torch.nn.functional.normalize(p["dense_vecs"][:, :dim], dim=-1)
        return torch.nn.functional.cross_entropy(qd @ pd.T / 0.05, targets)

    out = model.loss_from_reps(q, p)
    torch.testing.assert_close(out["loss"], ce(64) + 0.5 * ce(16))
    torch.testing.assert_close(out["parts"]["ce@16"], ce(16).detach())


@pytest.mark.parametrize("kd", [None, "kl_div"])
def test_use_mrl_matches_flagembedding(splade_tiny_dir, kd):
    """FlagEmbedding's ``use_mrl``: the mean of the per-dimension losses (trine: weights 1/len)."""
    fe_modeling = require("FlagEmbedding.finetune.embedder.encoder_only.base.modeling")
    from trine.training.arguments import EmbedderTrainingArguments

    args = EmbedderTrainingArguments(output_dir="unused", use_mrl=True, mrl_dims=[128, 64, 8], use_cpu=True)
    assert args.matryoshka_dims == [128, 64, 8] and args.matryoshka_weights == pytest.approx([1 / 3] * 3)
    ours = dense_model(splade_tiny_dir, matryoshka_dims=args.matryoshka_dims,
                       matryoshka_weights=args.matryoshka_weights, kd_loss_type=kd or "kl_div")
    fe_backbone = copy.deepcopy(ours.encoder.backbone)
    theirs = fe_modeling.BiEncoderOnlyEmbedderModel(
        fe_backbone, tokenizer=ours.encoder.tokenizer, temperature=0.05, kd_loss_type=kd or "kl_div",
        sentence_pooling_method="cls", normalize_embeddings=True, use_mrl=True, mrl_dims=[128, 64, 8],
    ).train()
    q, p = tokenize(ours.encoder.tokenizer, QUERIES), tokenize(ours.encoder.tokenizer, PASSAGES)
    teacher = TEACHER if kd else None
    got = ours(q, p, teacher_scores=teacher)["loss"]
    want = theirs(q, p, teacher_scores=None if teacher is None else teacher.flatten().tolist()).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.backward()
    want.backward()
    for (name, a), (_, b) in zip(ours.encoder.backbone.named_parameters(), fe_backbone.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unified_mode_truncates_the_dense_term_only(splade_tiny_dir):
    encoder = TriHeadModel.from_pretrained(splade_tiny_dir, init_missing_heads="random")
    no_dropout(encoder.backbone)
    plain = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=True).train()
    q, p = (plain.encode(tokenize(encoder.tokenizer, t)) for t in (QUERIES, PASSAGES))
    want = plain.loss_from_reps(q, p)
    full = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=True,
                                 matryoshka_dims=[128]).train()
    assert torch.equal(full.loss_from_reps(q, p)["loss"], want["loss"])
    cut = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=True,
                                matryoshka_dims=[16, 8]).train()
    got = cut.loss_from_reps(q, p)
    # the ensemble and the self-distillation use the full-size dense scores
    for part in ("sparse", "colbert", "ensemble", "self_distill_sparse", "self_distill_dense"):
        assert torch.equal(got["parts"][part], want["parts"][part]), part
    torch.testing.assert_close(got["parts"]["dense"], got["parts"]["dense_ce@16"] + got["parts"]["dense_ce@8"])
    assert not torch.equal(got["parts"]["dense"], want["parts"]["dense"])


def test_gradcache_equals_uncached(splade_tiny_dir):
    def make():
        return dense_model(splade_tiny_dir, matryoshka_dims=[128, 32, 4], matryoshka_weights=[1.0, 0.5, 0.25])

    ref = make()
    q, p = tokenize(ref.encoder.tokenizer, QUERIES), tokenize(ref.encoder.tokenizer, PASSAGES, max_len=40)
    want = ref(q, p, teacher_scores=TEACHER)
    want["loss"].backward()
    cached = make()
    got = gradcache_step(cached, cached, q, p, teacher_scores=TEACHER, chunk_size=3)
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-6, rtol=1e-6)
    g_ref, g_got = grads(ref), grads(cached)
    assert g_ref.keys() == g_got.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def _rank_run(rank, world, port, model_dir, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = dense_model(model_dir, matryoshka_dims=[128, 8], negatives_cross_device=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = len(QUERIES) // world
    tok = model.encoder.tokenizer
    out_ = ddp(tokenize(tok, QUERIES[rank * per: (rank + 1) * per]),
               tokenize(tok, PASSAGES[rank * per * GROUP: (rank + 1) * per * GROUP]))
    out_["loss"].backward()
    total = out_["loss"].detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "negatives": out_["negatives_per_query"], "grads": grads(model.encoder)},
                   out)
    dist.destroy_process_group()
    end_rank()


def test_cross_device_negatives_equal_one_process(tmp_path, splade_tiny_dir):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_run, args=(2, 29500 + os.getpid() % 150, splade_tiny_dir, out), nprocs=2, join=True)
    result = torch.load(out)
    model = dense_model(splade_tiny_dir, matryoshka_dims=[128, 8])
    full = model(tokenize(model.encoder.tokenizer, QUERIES), tokenize(model.encoder.tokenizer, PASSAGES))
    full["loss"].backward()
    assert result["negatives"] == full["negatives_per_query"] == len(PASSAGES) - 1
    torch.testing.assert_close(result["loss"], full["loss"].detach(), atol=1e-5, rtol=1e-5)
    for name, g in grads(model.encoder).items():
        torch.testing.assert_close(result["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_bad_options_name_the_option(splade_tiny_dir):
    from trine.training.arguments import EmbedderTrainingArguments

    for dims, weights, pattern in [([0, 8], None, "matryoshka_dims must be positive"),
                                   ([8, 8], None, "matryoshka_dims must be unique"),
                                   ([8, 4], [1.0], "matryoshka_weights needs one weight"),
                                   ([8], [-1.0], "matryoshka_weights must be positive"),
                                   (None, [1.0], "matryoshka_weights needs matryoshka_dims")]:
        with pytest.raises(ValueError, match=pattern):
            check_matryoshka(dims, weights)
    with pytest.raises(ValueError, match="matryoshka_dims must be positive and at most the hidden size 128"):
        dense_model(splade_tiny_dir, matryoshka_dims=[256])
    encoder = TriHeadModel.from_pretrained(splade_tiny_dir, init_missing_heads="neutral")
    with pytest.raises(ValueError, match="matryoshka_dims trains the dense vectors"):
        EmbedderTrainingModel(encoder, training_mode="sparse", matryoshka_dims=[8])
    common = {"output_dir": "unused", "use_cpu": True}
    with pytest.raises(ValueError, match="use_mrl needs mrl_dims"):
        EmbedderTrainingArguments(use_mrl=True, **common)
    with pytest.raises(ValueError, match="contradicts matryoshka_dims"):
        EmbedderTrainingArguments(use_mrl=True, mrl_dims=[8], matryoshka_dims=[16], **common)
    with pytest.raises(ValueError, match="matryoshka_dims must be unique"):
        EmbedderTrainingArguments(matryoshka_dims=[16, 16], **common)
    assert EmbedderTrainingArguments(mrl_dims=[8], **common).matryoshka_dims is None  # ignored, as FlagEmbedding
    assert EmbedderTrainingArguments(matryoshka_dims=[], **common).matryoshka_dims is None


def test_finetune_command_line(tmp_path, splade_tiny_dir):
    from test_finetune import common_args, write_data

    from trine.training.finetune import build_trainer, parse_args

    data = write_data(tmp_path / "train.jsonl")
    argv = common_args(splade_tiny_dir, data, tmp_path / "o", max_steps=2, save_steps=100)
    _, _, args = parse_args(argv + to_argv({"matryoshka_dims": ["64", "16"], "matryoshka_weights": ["1", "0.5"]}))
    assert args.matryoshka_dims == [64, 16] and args.matryoshka_weights == [1.0, 0.5]
    _, _, fe = parse_args(argv + ["--use_mrl", "--mrl_dims", "64", "32"])
    assert fe.matryoshka_dims == [64, 32] and fe.matryoshka_weights == [0.5, 0.5]
    trainer = build_trainer(*parse_args(argv + ["--matryoshka_dims", "64", "16"]))
    assert trainer.model.matryoshka_dims == (64, 16)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss_ce@16" in h]
    assert logged and all(np.isfinite(h["loss_ce@64"]) for h in logged)


# ---------------------------------------------------------------------- inference
def test_truncate_dim_gives_unit_truncated_vectors(minilm_dir):
    from trine import Embedder, M3Embedder

    texts = ["chmod changes file mode bits", "malloc allocates memory", "socket opens an endpoint"]
    full = Embedder(minilm_dir, show_progress=False, devices="cpu")
    vecs = full.encode(texts)
    cut = Embedder(full.model, truncate_dim=64, show_progress=False, devices="cpu").encode(texts)
    manual = vecs[:, :64] / np.linalg.norm(vecs[:, :64], axis=1, keepdims=True)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cut, manual, atol=1e-6)
    # per call, overriding the encoder's; one string gives one vector
    np.testing.assert_allclose(full.encode_result(texts[0], truncate_dim=64).dense_vecs, manual[0], atol=1e-6)
    assert full.encode_result([], truncate_dim=32).dense_vecs.shape == (0, 32)
    np.testing.assert_array_equal(full.encode_result(texts, truncate_dim=384).dense_vecs, vecs)
    # without normalisation the vectors are only cut
    raw = Embedder(full.model, normalize_embeddings=False, show_progress=False, devices="cpu")
    raw_full = raw.encode(texts)
    np.testing.assert_array_equal(raw.encode_result(texts, truncate_dim=64).dense_vecs, raw_full[:, :64])
    m3 = M3Embedder(full.model, truncate_dim=128, show_progress=False, devices="cpu")
    assert m3.encode(texts)["dense_vecs"].shape == (3, 128)
    for bad in (0, 385, 1.5):
        with pytest.raises(ValueError, match="truncate_dim must be an integer from 1 to the dense size 384"):
            Embedder(full.model, truncate_dim=bad, show_progress=False, devices="cpu")


# ---------------------------------------------------------------------- evaluation
def test_eval_dims_report_each_dimension(tmp_path, splade_tiny_dir, capsys):
    from test_evaluation import build_manpages_beir, fake_pages

    from trine import Embedder
    from trine.cli import main
    from trine.evaluation import EvalConfig, load_dataset, run_evaluation

    data = build_manpages_beir(tmp_path / "data", pages=fake_pages(60), seed=0)
    dataset = load_dataset(data, "test")
    model = Embedder(splade_tiny_dir, show_progress=False, devices="cpu")
    config = EvalConfig(modes=("dense",), k_values=(1, 10), top_k=20, dims=(128, 32))
    metrics = run_evaluation([model], dataset, config)["models"]["Embedder#1"]["metrics"]
    assert list(metrics) == ["dense", "dense@128", "dense@32"]
    assert metrics["dense@128"] == metrics["dense"]
    cut = Embedder(model.model, truncate_dim=32, show_progress=False, devices="cpu")
    alone = run_evaluation([cut], dataset, EvalConfig(modes=("dense",), k_values=(1, 10), top_k=20))
    assert metrics["dense@32"] == pytest.approx(alone["models"]["Embedder#1"]["metrics"]["dense"], abs=1e-6)
    with pytest.raises(ValueError, match="exceed the model's dense size 128"):
        run_evaluation([model], dataset, EvalConfig(modes=("dense",), k_values=(1, 10), top_k=20, dims=(256,)))
    with pytest.raises(ValueError, match="dims must be distinct positive integers"):
        EvalConfig(dims=(32, 32))
    rc = main(["eval", "--data", str(data), "--model", splade_tiny_dir, "--quiet", "--modes", "dense",
               "--dims", "128,64", "--k", "1,10", "--top-k", "20"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dense@128" in printed and "dense@64" in printed
