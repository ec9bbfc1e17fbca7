"""Reranker training: loss and gradient parity with FlagEmbedding's encoder-only reranker model,
the pointwise loss against a hand computation, and `trine finetune-reranker` end to end (learning on
real text, resume, bad data, torchrun with 2 processes equal to 1)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_reranker, require, to_argv
from test_finetune import PAGES, no_dropout_copy, weights, write_data

from trine.inference.reranker import Reranker
from trine.modeling.cross_encoder import CrossEncoder
from trine.training.data import Example
from trine.training.reranker import (
    RerankerCollator,
    RerankerTrainingModel,
    build_reranker_trainer,
    main,
    parse_reranker_args,
)

FlagEmbedding = require("FlagEmbedding")


@pytest.fixture(scope="module")
def tiny_bert_reranker(tmp_path_factory, minilm_dir):
    return make_tiny_reranker(str(tmp_path_factory.mktemp("rr_train")), minilm_dir, "bert", seed=3)


def batch_items(group: int, with_teacher: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    examples = []
    for i in range(4):
        passages = [PAGES[(i + k) % len(PAGES)][1] for k in range(group)]
        teacher = rng.normal(size=group).tolist() if with_teacher else None
        examples.append(Example(PAGES[i][0], passages, teacher, None))
    return [{"examples": examples, "in_batch_negatives": True}]


def no_dropout(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@pytest.mark.parametrize("with_teacher", [False, True])
def test_loss_and_gradients_match_flagembedding(tiny_bert_reranker, with_teacher):
    from FlagEmbedding.finetune.reranker.encoder_only.base.modeling import CrossEncoderModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    group = 3
    ours = CrossEncoder.from_pretrained(tiny_bert_reranker)
    collator = RerankerCollator(ours, query_max_len=16, passage_max_len=32, knowledge_distillation=with_teacher)
    batch = collator(batch_items(group, with_teacher))
    model = RerankerTrainingModel(ours).train()
    no_dropout(model)
    out = model(**batch)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_reranker, num_labels=1)
    flag = CrossEncoderModel(base, tokenizer=AutoTokenizer.from_pretrained(tiny_bert_reranker), train_batch_size=4)
    flag.train()
    no_dropout(flag)
    teacher = batch["teacher_scores"].flatten().tolist() if with_teacher else None
    ref = flag(pair=dict(batch["pairs"]), teacher_scores=teacher)

    assert out["loss"].item() > 0
    torch.testing.assert_close(out["loss"], ref.loss, atol=1e-5, rtol=0)
    out["loss"].backward()
    ref.loss.backward()
    ours_grads = dict(ours.model.named_parameters())
    for name, p in base.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(ours_grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    if with_teacher:
        assert set(out["parts"]) == {"ce", "kd"}


def test_pointwise_bce_equals_hand_computation(tiny_bert_reranker):
    ours = CrossEncoder.from_pretrained(tiny_bert_reranker)
    model = RerankerTrainingModel(ours, reranker_loss="bce")
    logits = torch.tensor([2.0, -1.0, 0.5, -0.3, 1.5, 0.0])
    out = model.loss(logits, group_size=3)
    labels = [1, 0, 0, 1, 0, 0]
    ref = -np.mean([math.log(1 / (1 + math.exp(-x))) if y else math.log(1 - 1 / (1 + math.exp(-x)))
                    for x, y in zip(logits.tolist(), labels)])
    assert abs(out["loss"].item() - ref) < 1e-6
    teacher = torch.tensor([[3.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    with_kd = model.loss(logits, 3, teacher)
    t = torch.softmax(teacher, -1)
    kd = -(t * torch.log_softmax(logits.view(2, 3), -1)).sum(-1).mean().item()
    assert abs(with_kd["loss"].item() - (ref + kd)) < 1e-5
    with pytest.raises(ValueError, match="groups of 4"):
        model.loss(logits, 4)


def common_args(model_dir, data, out, **extra):
    args = {
        "model_name_or_path": model_dir, "train_data": [data], "output_dir": str(out), "train_group_size": 3,
        "per_device_train_batch_size": 4, "query_max_len": 16, "passage_max_len": 32, "learning_rate": 5e-4,
        "max_steps": 6, "save_steps": 3, "logging_steps": 1, "report_to": "none", "seed": 11, "use_cpu": True,
    }
    args.update(extra)
    return to_argv(args)


@pytest.mark.parametrize("loss", ["group_ce", "bce"])
def test_training_learns_on_real_pairs(tmp_path, splade_tiny_dir, loss):
    """From a backbone (new classifier): after training, each query's own page outscores the others."""
    data = write_data(tmp_path / "train.jsonl", n_neg=4)
    trainer = build_reranker_trainer(*parse_reranker_args(common_args(
        splade_tiny_dir, data, tmp_path / "out", train_group_size=5, max_steps=60, save_steps=100,
        learning_rate=1e-3, reranker_loss=loss, warmup_steps=0)))
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(logs[-5:]) < (0.5 if loss == "group_ce" else 0.9) * np.mean(logs[:5])
    reranker = Reranker(str(tmp_path / "out"), devices="cpu", show_progress=False)
    hits = 0
    for i, (q, _) in enumerate(PAGES):
        scores = reranker.compute_score([(q, d) for _, d in PAGES], max_length=48, query_max_length=16)
        hits += int(np.argmax(scores) == i)
    assert hits >= (12 if loss == "group_ce" else 8), hits  # of 16; an untrained classifier gets about 1
    flag = FlagEmbedding.FlagReranker(str(tmp_path / "out"), use_fp16=False, devices="cpu")
    pairs = [(q, d) for q, d in PAGES[:5]]
    np.testing.assert_allclose(reranker.compute_score(pairs), flag.compute_score(pairs), atol=1e-5)


def test_resume_ends_with_the_same_weights(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    full = build_reranker_trainer(*parse_reranker_args(common_args(splade_tiny_dir, data, tmp_path / "full")))
    full.train()
    full.save_model(str(tmp_path / "full"))
    resumed = build_reranker_trainer(*parse_reranker_args(common_args(splade_tiny_dir, data, tmp_path / "resumed")))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    resumed.save_model(str(tmp_path / "resumed"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    start = weights(tmp_path / "full" / "checkpoint-3")
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_bad_data_and_bad_options_exit_2(tmp_path, splade_tiny_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q", "pos": ["p"], "neg": ["n", "m"]}\n{"query": "q2", "pos": "p", "neg": []}\n')
    out = tmp_path / "out"
    assert main(common_args(splade_tiny_dir, str(data), out)) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: pos: must be a list of strings" in err
    assert not out.exists()
    good = write_data(tmp_path / "train.jsonl")
    assert main(common_args(splade_tiny_dir, good, out, reranker_loss="listwise")) == 2
    assert "reranker_loss" in capsys.readouterr().err
    assert main(common_args(splade_tiny_dir, good, out, no_such_option=1)) == 2
    kd = common_args(splade_tiny_dir, good, out, knowledge_distillation=True)
    assert main(kd) == 2  # no pos_scores / neg_scores in the file
    assert not out.exists()


def test_torchrun_two_processes_equal_one(tmp_path, splade_tiny_dir):
    """2 ranks of 2 queries train exactly like 1 rank of 4 (DDP averages the per-rank means).

    Plain SGD: under the group loss the classifier bias gets no gradient (softmax ignores a shift),
    and Adam would blow its rounding noise up to full-size steps of random sign."""
    model = no_dropout_copy(splade_tiny_dir, tmp_path / "model")
    from transformers import set_seed

    set_seed(11)  # the trainer seeds the new classifier with the run's seed
    CrossEncoder.from_pretrained(model, new_classifier=True).save_pretrained(tmp_path / "start")
    data = write_data(tmp_path / "train.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    one = common_args(model, data, tmp_path / "one", max_steps=3, save_steps=100, optim="sgd", learning_rate=0.5)
    proc = subprocess.run([sys.executable, "-m", "trine.training.reranker", *one], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = common_args(model, data, tmp_path / "two", max_steps=3, save_steps=100, per_device_train_batch_size=2,
                      optim="sgd", learning_rate=0.5)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29300 + os.getpid() % 300), "-m", "trine.training.reranker", *two],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = weights(tmp_path / "start")
    assert a.keys() == b.keys() == start.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def test_gradient_checkpointing_accumulation_bf16_and_kd_run(tmp_path, splade_tiny_dir):
    import json

    data = tmp_path / "kd.jsonl"
    with open(data, "w") as f:
        for i, (q, d) in enumerate(PAGES):
            negs = [PAGES[(i + k + 1) % len(PAGES)][1] for k in range(2)]
            f.write(json.dumps({"query": q, "pos": [d], "neg": negs, "pos_scores": [2.0],
                                "neg_scores": [0.5, -1.0]}) + "\n")
    trainer = build_reranker_trainer(*parse_reranker_args(common_args(
        splade_tiny_dir, str(data), tmp_path / "o", max_steps=2, save_steps=100, gradient_checkpointing=True,
        gradient_accumulation_steps=2, bf16=True, per_device_train_batch_size=2, knowledge_distillation=True)))
    trainer.train()
    assert trainer.model.encoder.model.is_gradient_checkpointing
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["loss"] > 0 and h["loss_kd"] > 0 and h["loss_ce"] > 0 for h in logs)
