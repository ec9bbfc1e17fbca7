"""Unified (BGE-M3) and single-head training: parity with FlagEmbedding's M3 model, frozen parts,
cross-device negatives for every head."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import end_rank, require
from test_training_loss import GROUP, PASSAGES, QUERIES, no_dropout, tokenize

from trine import TriHeadModel
from trine.training.model import EmbedderTrainingModel

TEACHER = torch.tensor([[3.0, 1.0, 0.5], [2.0, 2.5, 0.0], [1.0, 0.0, -1.0], [0.2, 0.1, 0.3]])


def fe_m3(encoder: TriHeadModel, **kw):
    modeling = require("FlagEmbedding.finetune.embedder.encoder_only.m3.modeling")
    base = {
        "model": copy.deepcopy(encoder.backbone),
        "colbert_linear": copy.deepcopy(encoder.colbert_linear),
        "sparse_linear": copy.deepcopy(encoder.sparse_linear),
    }
    return modeling.EncoderOnlyEmbedderM3Model(
        base, tokenizer=encoder.tokenizer, temperature=0.05, unified_finetuning=True, normalize_embeddings=True,
        sentence_pooling_method="cls", **kw,
    ).train()


@pytest.mark.parametrize(
    "self_distill,kd",
    [(False, None), (True, None), (False, "kl_div"), (False, "m3_kd_loss"), (True, "m3_kd_loss")],
)
def test_unified_loss_and_gradients_match_flagembedding(tiny_m3_dir, self_distill, kd):
    encoder = TriHeadModel.from_pretrained(tiny_m3_dir)
    no_dropout(encoder.backbone)
    theirs = fe_m3(encoder, use_self_distill=self_distill, self_distill_start_step=-1, kd_loss_type=kd or "kl_div")
    ours = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", use_self_distill=self_distill,
                                 kd_loss_type=kd or "kl_div").train()
    q, p = tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES)
    teacher = TEACHER if kd else None
    out = ours(q, p, teacher_scores=teacher)
    want = theirs(q, p, teacher_scores=None if teacher is None else teacher.flatten().tolist()).loss
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)
    assert {"dense", "sparse", "colbert", "ensemble"} <= set(out["parts"])
    assert ("self_distill_dense" in out["parts"]) == self_distill
    out["loss"].backward()
    want.backward()
    pairs = [(encoder.backbone, theirs.model), (encoder.colbert_linear, theirs.colbert_linear),
             (encoder.sparse_linear, theirs.sparse_linear)]
    for mine, ref in pairs:
        for (name, a), (_, b) in zip(mine.named_parameters(), ref.named_parameters()):
            if a.grad is None and b.grad is None:
                continue
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode,fix_encoder", [("colbert", True), ("colbert", False), ("sparse", True)])
def test_single_head_modes_train_only_their_part(tmp_path, tiny_m3_dir, mode, fix_encoder):
    encoder = TriHeadModel.from_pretrained(tiny_m3_dir)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = EmbedderTrainingModel(encoder, temperature=0.05, training_mode=mode, fix_encoder=fix_encoder).train()
    trainable = {n for n, prm in encoder.named_parameters() if prm.requires_grad}
    head = "colbert_linear" if mode == "colbert" else "sparse_linear"
    assert trainable and all(n.startswith(head) or (not fix_encoder and n.startswith("backbone.")) for n in trainable)
    optim = torch.optim.SGD([prm for prm in encoder.parameters() if prm.requires_grad], lr=0.5)
    for _ in range(2):
        out = model(tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES))
        assert set(out["parts"]) == {"ce"}
        out["loss"].backward()
        optim.step()
        optim.zero_grad()
    after = encoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(head) for k in changed)
    for k in before:
        if k.startswith(head) or (not fix_encoder and k.startswith("backbone.")):
            continue
        assert torch.equal(before[k], after[k]), f"{k} changed in {mode} mode"
    encoder.save_pretrained(tmp_path / "saved")  # still a tri-head checkpoint
    reloaded = TriHeadModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.state_dict()[f"{head}.weight"], after[f"{head}.weight"])


def test_modes_need_heads_and_valid_options(splade_tiny_dir):
    encoder = TriHeadModel.from_pretrained(splade_tiny_dir, with_heads=False)
    with pytest.raises(ValueError, match="needs lexical and ColBERT heads"):
        EmbedderTrainingModel(encoder, training_mode="unified")
    with pytest.raises(ValueError, match="use_self_distill"):
        EmbedderTrainingModel(encoder, training_mode="dense", use_self_distill=True)


def _rank_run(rank, world, port, model_dir, out, self_distill, options=None):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    encoder = TriHeadModel.from_pretrained(model_dir)
    no_dropout(encoder.backbone)
    model = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified", negatives_cross_device=True,
                                  use_self_distill=self_distill, **(options or {}))
    ddp = torch.nn.parallel.DistributedDataParallel(model.train())
    per = len(QUERIES) // world
    # rank 1 gets longer passages, so the gathered ColBERT vectors need padding
    qs = QUERIES[rank * per : (rank + 1) * per]
    ps = PASSAGES[rank * per * GROUP : (rank + 1) * per * GROUP]
    out_ = ddp(tokenize(encoder.tokenizer, qs), tokenize(encoder.tokenizer, ps))
    out_["loss"].backward()
    total = out_["loss"].detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "negatives": out_["negatives_per_query"],
                    "grads": {n: prm.grad for n, prm in encoder.named_parameters()}}, out)
    dist.destroy_process_group()
    end_rank()


@pytest.mark.parametrize("self_distill", [False, True])
def test_unified_cross_device_all_heads_equal_one_process(tmp_path, tiny_m3_dir, self_distill):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_run, args=(2, 29700 + os.getpid() % 200 + self_distill, tiny_m3_dir, out, self_distill),
             nprocs=2, join=True)
    result = torch.load(out)
    encoder = TriHeadModel.from_pretrained(tiny_m3_dir)
    no_dropout(encoder.backbone)
    model = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="unified",
                                  use_self_distill=self_distill).train()
    full = model(tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES))
    full["loss"].backward()
    assert result["negatives"] == full["negatives_per_query"] == len(PASSAGES) - 1  # every head saw all passages
    torch.testing.assert_close(result["loss"], full["loss"].detach(), atol=1e-5, rtol=1e-5)
    for name, prm in encoder.named_parameters():
        if prm.grad is None:
            assert result["grads"][name] is None, name
            continue
        torch.testing.assert_close(result["grads"][name], prm.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sparse_temperature_and_flops_regulariser(tiny_m3_dir):
    """The lexical head's own temperature divides only its scores; the FLOPS term is SPLADE's
    sum_j (mean_i w_ij)^2 over the batch's queries and passages, added with its weight; non-zeros
    per text are reported."""
    from trine.modeling.heads import lexical_matrix

    encoder = TriHeadModel.from_pretrained(tiny_m3_dir)
    no_dropout(encoder.backbone)
    q, p = tokenize(encoder.tokenizer, QUERIES), tokenize(encoder.tokenizer, PASSAGES)
    base = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="sparse").train()
    reps_q, reps_p = base.encode(q), base.encode(p)
    plain = base.loss_from_reps(reps_q, reps_p)
    q_mat = lexical_matrix(reps_q["token_weights"], reps_q["input_ids"], encoder.vocab_size)
    p_mat = lexical_matrix(reps_p["token_weights"], reps_p["input_ids"], encoder.vocab_size)
    assert plain["stats"]["sparse_nonzeros_query"] == pytest.approx(float((q_mat > 0).sum(1).float().mean()))
    assert plain["stats"]["sparse_nonzeros_passage"] == pytest.approx(float((p_mat > 0).sum(1).float().mean()))

    hotter = EmbedderTrainingModel(encoder, temperature=0.05, sparse_temperature=0.5, training_mode="sparse")
    scores = (q_mat @ p_mat.T) / 0.5
    targets = torch.arange(len(QUERIES)) * GROUP
    want = torch.nn.functional.cross_entropy(scores, targets)
    torch.testing.assert_close(hotter.loss_from_reps(reps_q, reps_p)["loss"], want, atol=1e-5, rtol=1e-5)

    regularised = EmbedderTrainingModel(encoder, temperature=0.05, training_mode="sparse", sparse_flops_weight=0.3)
    out = regularised.loss_from_reps(reps_q, reps_p)
    hand = (q_mat.mean(0) ** 2).sum() + (p_mat.mean(0) ** 2).sum()
    torch.testing.assert_close(out["parts"]["sparse_flops"], hand.detach())
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.3 * hand, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sparse_temperature"):
        EmbedderTrainingModel(encoder, sparse_temperature=0.0, training_mode="sparse")
