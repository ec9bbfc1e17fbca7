"""Gradient caching: the same gradients as without caching, for every mode, also across 2 processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import end_rank
from test_training_loss import PASSAGES, QUERIES, no_dropout, tokenize

from trine import TriHeadModel
from trine.training.gradcache import concat_reps, gradcache_step, split_features
from trine.training.model import EmbedderTrainingModel

TEACHER = torch.tensor([[3.0, 1.0, 0.5], [2.0, 2.5, 0.0], [1.0, 0.0, -1.0], [0.2, 0.1, 0.3]])


def make(model_dir, mode, self_distill=False, cross=False, dropout=True):
    torch.manual_seed(0)
    encoder = TriHeadModel.from_pretrained(model_dir)
    if not dropout:
        no_dropout(encoder.backbone)
    return EmbedderTrainingModel(
        encoder, temperature=0.05, training_mode=mode, use_self_distill=self_distill, negatives_cross_device=cross
    ).train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_features_trims_padding_and_respects_budgets(tiny_m3_dir):
    tok = TriHeadModel.from_pretrained(tiny_m3_dir).tokenizer
    feats = tokenize(tok, PASSAGES, max_len=40)
    parts = split_features(feats, chunk_size=5)
    assert [p["input_ids"].size(0) for p in parts] == [5, 5, 2]
    for p in parts:
        assert p["attention_mask"][:, -1].any()  # trimmed to the longest row of the sub-batch
    budget = split_features(feats, max_tokens=40)
    assert all(p["input_ids"].numel() <= 40 or p["input_ids"].size(0) == 1 for p in budget)
    assert sum(p["input_ids"].size(0) for p in budget) == len(PASSAGES)
    with pytest.raises(ValueError, match="sub-batch size or a token budget"):
        split_features(feats)


@pytest.mark.parametrize(
    "mode,self_distill,kd",
    [
        ("dense", False, False),
        ("sparse", False, False),
        ("colbert", False, True),
        ("unified", True, False),
        ("unified", False, True),
    ],
)
def test_gradcache_equals_uncached_with_dropout(tiny_m3_dir, mode, self_distill, kd):
    tok = TriHeadModel.from_pretrained(tiny_m3_dir).tokenizer
    q, p = tokenize(tok, QUERIES), tokenize(tok, PASSAGES, max_len=40)
    teacher = TEACHER if kd else None
    # without caching: the same sub-batches encoded with a graph (same dropout draws), one backward
    ref = make(tiny_m3_dir, mode, self_distill)
    torch.manual_seed(1)
    reps = {
        name: concat_reps([ref.encode(c) for c in split_features(f, chunk_size=3)]) for name, f in (("q", q), ("p", p))
    }
    want = ref.loss_from_reps(reps["q"], reps["p"], teacher)
    want["loss"].backward()
    cached = make(tiny_m3_dir, mode, self_distill)
    torch.manual_seed(1)
    got = gradcache_step(cached, cached, q, p, teacher_scores=teacher, chunk_size=3)
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-6, rtol=1e-6)
    g_ref, g_got = grads(ref), grads(cached)
    assert g_ref.keys() == g_got.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradcache_token_budget_equals_full_batch_without_dropout(tiny_m3_dir):
    tok = TriHeadModel.from_pretrained(tiny_m3_dir).tokenizer
    q, p = tokenize(tok, QUERIES), tokenize(tok, PASSAGES, max_len=40)
    full = make(tiny_m3_dir, "unified", True, dropout=False)
    full(q, p)["loss"].backward()
    cached = make(tiny_m3_dir, "unified", True, dropout=False)
    gradcache_step(cached, cached, q, p, max_tokens=50)
    for name, g in grads(full).items():
        torch.testing.assert_close(grads(cached)[name], g, atol=1e-5, rtol=1e-4, msg=name)


def _rank_run(rank, world, port, model_dir, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make(model_dir, "unified", True, cross=True, dropout=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = len(QUERIES) // world
    tok = model.encoder.tokenizer
    q = tokenize(tok, QUERIES[rank * per : (rank + 1) * per])
    p = tokenize(tok, PASSAGES[rank * per * 3 : (rank + 1) * per * 3], max_len=40)
    result = gradcache_step(ddp, model, q, p, chunk_size=2)
    total = result["loss"].detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "grads": grads(model)}, out)
    dist.destroy_process_group()
    end_rank()


def test_gradcache_two_processes_cross_device_equal_one_process(tmp_path, tiny_m3_dir):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_run, args=(2, 29800 + os.getpid() % 150, tiny_m3_dir, out), nprocs=2, join=True)
    result = torch.load(out)
    single = make(tiny_m3_dir, "unified", True, dropout=False)
    tok = single.encoder.tokenizer
    loss = single(tokenize(tok, QUERIES), tokenize(tok, PASSAGES, max_len=40))["loss"]
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    for name, g in grads(single).items():
        torch.testing.assert_close(result["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
