"""`trine finetune` end to end: resume, bad data, and torchrun with 2 processes equal to 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import to_argv
from safetensors.torch import load_file

from trine import TriHeadModel
from trine.training.finetune import build_trainer, main, parse_args

PAGES = [
    ("change file mode bits", "chmod changes the file mode bits of each given file according to mode"),
    ("allocate dynamic memory", "malloc allocates size bytes and returns a pointer to the allocated memory"),
    ("create an endpoint for communication", "socket creates an endpoint for communication and returns a descriptor"),
    ("formatted output conversion", "printf produces output according to a format string"),
    ("wait for process to change state", "waitpid suspends execution until a child changes state"),
    ("list directory contents", "ls lists information about the files in the current directory"),
    ("copy files and directories", "cp copies a source file to a destination file or directory"),
    ("remove files or directories", "rm removes each specified file and does not remove directories by default"),
    ("send a signal to a process", "kill sends a signal to a process or a group of processes"),
    ("create a pipe", "pipe creates a unidirectional data channel for interprocess communication"),
    ("open and possibly create a file", "open opens the file specified by pathname and returns a descriptor"),
    ("close a file descriptor", "close closes a file descriptor so that it no longer refers to any file"),
    ("read from a file descriptor", "read attempts to read up to count bytes from a file descriptor"),
    ("write to a file descriptor", "write writes up to count bytes from the buffer to the file"),
    ("get process identification", "getpid returns the process ID of the calling process"),
    ("sleep for a specified number of seconds", "sleep makes the calling thread sleep until seconds have elapsed"),
]


def write_data(path, n_neg=2):
    with open(path, "w") as f:
        for i, (q, d) in enumerate(PAGES):
            negs = [PAGES[(i + k + 1) % len(PAGES)][1] for k in range(n_neg)]
            f.write(json.dumps({"query": q, "pos": [d], "neg": negs}) + "\n")
    return str(path)


def common_args(model_dir, data, out, **extra):
    args = {
        "model_name_or_path": model_dir,
        "train_data": [data],
        "output_dir": str(out),
        "train_group_size": 3,
        "per_device_train_batch_size": 4,
        "query_max_len": 16,
        "passage_max_len": 32,
        "learning_rate": 1e-4,
        "max_steps": 6,
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "seed": 11,
        "temperature": 0.05,
        "use_cpu": True,
    }
    args.update(extra)
    return to_argv(args)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_ends_with_the_same_weights(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    full = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "full")))
    full.train()
    full.save_model(str(tmp_path / "full"))
    assert os.path.exists(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    resumed = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "resumed")))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    resumed.save_model(str(tmp_path / "resumed"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    start = weights(tmp_path / "full" / "checkpoint-3")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the second half did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_bad_data_exits_nonzero_and_writes_nothing(tmp_path, splade_tiny_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q", "pos": ["p"], "neg": ["n", "m"]}\n{"query": "", "pos": []}\n')
    out = tmp_path / "out"
    code = main(common_args(splade_tiny_dir, str(data), out))
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}:2: query: empty" in err and f"{data}:2: pos: missing" not in err and f"{data}:2: pos: empty" in err
    assert not out.exists()


def test_config_file_and_unknown_options(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_name_or_path": splade_tiny_dir, "train_data": [data],
                               "output_dir": str(tmp_path / "o"), "train_group_size": 2, "temperature": 0.03}))
    model_args, data_args, args = parse_args([str(cfg)])
    assert data_args.train_group_size == 2 and args.temperature == 0.03
    cfg.write_text(json.dumps({"model_name_or_path": splade_tiny_dir, "train_data": [data],
                               "output_dir": str(tmp_path / "o"), "negs_per_query": 3}))
    with pytest.raises(ValueError, match="negs_per_query"):
        parse_args([str(cfg)])
    with pytest.raises(ValueError, match="no_such_option"):
        parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", no_such_option=1))
    assert main(common_args(splade_tiny_dir, data, tmp_path / "o", no_such_option=1)) == 2


def no_dropout_copy(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_torchrun_two_processes_equal_one(tmp_path, splade_tiny_dir):
    """Cross-device negatives over 2 ranks of 2 queries train exactly like 1 rank of 4."""
    model = no_dropout_copy(splade_tiny_dir, tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    one = common_args(model, data, tmp_path / "one", max_steps=3, save_steps=100)
    subprocess.run([sys.executable, "-m", "trine.training.finetune", *one], check=True, env=env,
                   capture_output=True, timeout=600)
    two = common_args(model, data, tmp_path / "two", max_steps=3, save_steps=100, per_device_train_batch_size=2,
                      negatives_cross_device=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29600 + os.getpid() % 300), "-m", "trine.training.finetune", *two],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    TriHeadModel.from_pretrained(model, with_heads=False).save_pretrained(tmp_path / "start")
    start = weights(tmp_path / "start")
    assert a.keys() == b.keys() == start.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def test_retrieval_eval_is_logged_before_and_during_training(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    with open(beir / "corpus.jsonl", "w") as c, open(beir / "queries.jsonl", "w") as q:
        for i, (query, doc) in enumerate(PAGES):
            c.write(json.dumps({"_id": f"d{i}", "title": "", "text": doc}) + "\n")
            q.write(json.dumps({"_id": f"q{i}", "text": query}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(PAGES))))
    trainer = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", max_steps=4,
                                                    save_steps=100, eval_data=str(beir), retrieval_eval_steps=2)))
    trainer.train()
    evals = [(h["step"], h["eval_ndcg_at_10"]) for h in trainer.state.log_history if "eval_ndcg_at_10" in h]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert all(0 < v <= 1 for _, v in evals)
    with pytest.raises(ValueError, match="needs eval_data"):
        build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", retrieval_eval_steps=2)))


@pytest.mark.parametrize("recipe", ["stage2_pairs.yaml", "stage3_hard_negatives.yaml"])
def test_example_recipes_parse(recipe):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_args, data_args, args = parse_args([os.path.join(root, "examples", recipe)])
    assert args.negatives_cross_device and data_args.train_data


def test_gradient_checkpointing_accumulation_and_bf16_run(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(
        splade_tiny_dir, data, tmp_path / "o", max_steps=2, save_steps=100, gradient_checkpointing=True,
        gradient_accumulation_steps=2, bf16=True, per_device_train_batch_size=2,
    )))
    trainer.train()
    backbone = trainer.model.encoder.backbone
    assert backbone.is_gradient_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(x > 0 for x in losses)


def test_head_learning_rate_puts_heads_in_their_own_group(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(
        splade_tiny_dir, data, tmp_path / "o", training_mode="unified", init_missing_heads="neutral",
        head_learning_rate=0.01,
    )))
    optimizer = trainer.create_optimizer()
    encoder = trainer.model.encoder
    heads = {id(p) for m in (encoder.colbert_linear, encoder.sparse_linear) for p in m.parameters()}
    head_groups = [g for g in optimizer.param_groups if any(id(p) in heads for p in g["params"])]
    assert len(head_groups) == 1 and head_groups[0]["lr"] == 0.01
    assert {id(p) for p in head_groups[0]["params"]} == heads
    others = [p for g in optimizer.param_groups if g is not head_groups[0] for p in g["params"]]
    assert others and all(g["lr"] == 1e-4 for g in optimizer.param_groups if g is not head_groups[0])
    dense = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "d", head_learning_rate=0.01)))
    with pytest.raises(ValueError, match="no head is trained"):
        dense.create_optimizer()


def test_trainer_with_gradient_caching_matches_plain_training(tmp_path, splade_tiny_dir):
    model = no_dropout_copy(splade_tiny_dir, tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl")
    finals = []
    variants = (("plain", {}), ("cached", {"gradcache_chunk_size": 3}), ("budget", {"gradcache_max_tokens": 40}))
    for name, extra in variants:
        trainer = build_trainer(*parse_args(common_args(model, data, tmp_path / name, max_steps=3, save_steps=100,
                                                        **extra)))
        trainer.train()
        trainer.save_model(str(tmp_path / name))
        assert [h for h in trainer.state.log_history if "loss_ce" in h]
        finals.append(weights(tmp_path / name))
    for other in finals[1:]:
        for k in finals[0]:
            torch.testing.assert_close(other[k], finals[0][k], atol=1e-5, rtol=1e-4, msg=k)


def test_gradient_caching_with_checkpointing_and_bf16_runs(tmp_path, tiny_m3_dir):
    data = write_data(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(
        tiny_m3_dir, data, tmp_path / "o", max_steps=2, save_steps=100, training_mode="unified",
        use_self_distill=True, gradcache_max_tokens=64, gradient_checkpointing=True, bf16=True,
    )))
    trainer.train()
    assert trainer.model.encoder.backbone.is_gradient_checkpointing
    logged = [h for h in trainer.state.log_history if "loss_ensemble" in h]
    assert len(logged) == 2 and all(h["loss"] > 0 for h in logged)
