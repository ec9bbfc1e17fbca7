"""Bad input never gives a traceback: typed options, unreadable files and folders, library edge cases.

Each command-line case runs ``trine.cli.main`` and checks the exit code 2, one ``error:`` line
naming the file (and line) or the option, no traceback, the inputs unchanged and nothing written.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from trine import Embedder, M3Embedder, Reranker, TriHeadModel, scoring
from trine.cli import main
from trine.errors import InputError, OptionError, UserError

GOOD = [
    {"query": "change file mode bits", "pos": ["chmod changes the file mode bits of each given file"],
     "neg": ["malloc allocates size bytes", "socket creates an endpoint for communication"]},
    {"query": "allocate dynamic memory", "pos": ["malloc allocates size bytes and returns a pointer"],
     "neg": ["chmod changes the file mode bits", "printf produces output according to a format"]},
]


def jsonl(path, rows, extra: bytes = b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + extra)
    return str(path)


def not_utf8_file(path):
    """Line 3 holds a Latin-1 byte (0xe9), as a file saved in the wrong encoding would."""
    return jsonl(path, GOOD, b'{"query": "caf\xe9", "pos": ["un caf\xe9"]}\n')


def snapshot(*paths):
    """Every file under ``paths`` with its bytes: the inputs must come out of a failed command unchanged."""
    out = {}
    for p in map(str, paths):
        if os.path.isfile(p):
            out[p] = open(p, "rb").read()
        for root, _, files in os.walk(p):
            for f in files:
                out[os.path.join(root, f)] = open(os.path.join(root, f), "rb").read()
    return out


def fails(capsys, argv, *needles, inputs=(), absent=()):
    """``trine argv`` exits 2 with one ``error:`` line holding every needle; inputs are unchanged, nothing
    is written at ``absent``. Returns the error line."""
    before = snapshot(*inputs)
    capsys.readouterr()
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert snapshot(*inputs) == before
    for path in absent:
        assert not os.path.exists(path), path
    return lines[0]


def yaml_config(tmp_path, model_dir, data, out, extra: str) -> str:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {model_dir}\ntrain_data: [{data}]\noutput_dir: {out}\nreport_to: none\n"
                   + extra)
    return str(cfg)


# ---------------------------------------------------------------------------------------------- 5. typed options
def test_yaml_number_written_1e_4_is_a_float(tmp_path, splade_tiny_dir):
    from trine.training.finetune import parse_args

    data = jsonl(tmp_path / "train.jsonl", GOOD)
    cfg = yaml_config(tmp_path, splade_tiny_dir, data, tmp_path / "out",
                      "learning_rate: 1e-4\nnormalize_embeddings: 'no'\nfile_options: {x.jsonl: {batch_size: 2}}\n")
    model_args, data_args, args = parse_args([cfg])
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert model_args.normalize_embeddings is False  # 'no' is false, not a true non-empty string
    assert data_args.file_options == {"x.jsonl": {"batch_size": 2}}


@pytest.mark.parametrize("command", ["finetune", "finetune-reranker", "pretrain"])
def test_yaml_option_of_the_wrong_type(tmp_path, splade_tiny_dir, capsys, command):
    data = jsonl(tmp_path / "train.jsonl", GOOD)
    cfg = yaml_config(tmp_path, splade_tiny_dir, data, tmp_path / "out", "per_device_train_batch_size: four\n")
    fails(capsys, [command, cfg], f"{cfg}:5: per_device_train_batch_size: expected an integer, got 'four'",
          inputs=[cfg, data], absent=[tmp_path / "out"])


def test_yaml_boolean_takes_only_true_false_spellings(tmp_path, splade_tiny_dir, capsys):
    data = jsonl(tmp_path / "train.jsonl", GOOD)
    cfg = yaml_config(tmp_path, splade_tiny_dir, data, tmp_path / "out", "normalize_embeddings: 'maybe'\n")
    fails(capsys, ["finetune", cfg], f"{cfg}:5: normalize_embeddings: expected a boolean", "'maybe'",
          inputs=[cfg], absent=[tmp_path / "out"])


def test_yaml_unknown_and_repeated_options(tmp_path, splade_tiny_dir, capsys):
    data = jsonl(tmp_path / "train.jsonl", GOOD)
    cfg = yaml_config(tmp_path, splade_tiny_dir, data, tmp_path / "out", "learning_rate: 1e-4\nlearning_rate: 2\n")
    fails(capsys, ["finetune", cfg], f"{cfg}:6: learning_rate: given twice", inputs=[cfg])


def test_flag_of_the_wrong_type(tmp_path, splade_tiny_dir, capsys):
    data = jsonl(tmp_path / "train.jsonl", GOOD)
    argv = ["finetune", "--model_name_or_path", splade_tiny_dir, "--train_data", data, "--output_dir",
            tmp_path / "out", "--per_device_train_batch_size", "four"]
    fails(capsys, argv, "--per_device_train_batch_size: expected an integer, got 'four'", absent=[tmp_path / "out"])
    argv[-2:] = ["--normalize_embeddings", "maybe"]
    fails(capsys, argv, "--normalize_embeddings: expected a boolean", absent=[tmp_path / "out"])


def test_resume_from_checkpoint_true_is_the_boolean(tmp_path, splade_tiny_dir):
    from trine.training.finetune import parse_args

    data = jsonl(tmp_path / "train.jsonl", GOOD)
    argv = ["--model_name_or_path", splade_tiny_dir, "--train_data", data, "--output_dir", str(tmp_path / "o")]

    def resume(value):
        return parse_args([*argv, "--resume_from_checkpoint", value])[2].resume_from_checkpoint

    assert resume("True") is True and resume("false") is None and resume("o/checkpoint-3") == "o/checkpoint-3"
    cfg = yaml_config(tmp_path, splade_tiny_dir, data, tmp_path / "o", "resume_from_checkpoint: true\n")
    assert parse_args([cfg])[2].resume_from_checkpoint is True


# ---------------------------------------------------------------------------------------------- 6. ColBERT size
def test_colbert_dim_comes_from_the_saved_head(tmp_path, splade_tiny_dir):
    torch.manual_seed(0)
    model = TriHeadModel.from_pretrained(splade_tiny_dir, init_missing_heads="random", colbert_dim=64)
    out = tmp_path / "m64"
    model.save_pretrained(out)
    again = TriHeadModel.from_pretrained(out)  # defaults: colbert_dim -1
    assert again.colbert_linear.out_features == 64
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    texts = ["chmod changes the file mode bits", "malloc allocates memory"]
    first = M3Embedder(model, show_progress=False).encode(texts, return_sparse=True, return_colbert_vecs=True)
    second = M3Embedder(str(out), show_progress=False).encode(texts, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_array_equal(first["dense_vecs"], second["dense_vecs"])
    for a, b in zip(first["colbert_vecs"], second["colbert_vecs"]):
        assert a.shape[1] == 64
        np.testing.assert_array_equal(a, b)
    assert first["lexical_weights"] == second["lexical_weights"]
    with pytest.raises(OptionError, match="colbert_dim: 32 asked, but .*colbert_linear.pt holds a 64-dim"):
        TriHeadModel.from_pretrained(out, colbert_dim=32)


# ---------------------------------------------------------------------------------------------- 7. unreadable input
@pytest.mark.parametrize("command", ["finetune", "finetune-reranker"])
def test_training_file_not_utf8(tmp_path, splade_tiny_dir, capsys, command):
    data = not_utf8_file(tmp_path / "train.jsonl")
    argv = [command, "--model_name_or_path", splade_tiny_dir, "--train_data", data, "--output_dir", tmp_path / "o",
            "--train_group_size", "2", "--report_to", "none"]
    fails(capsys, argv, f"{data}:3: (line): not UTF-8: byte 0xe9", inputs=[data], absent=[tmp_path / "o"])


def test_split_by_length_file_not_utf8(tmp_path, splade_tiny_dir, capsys):
    data = not_utf8_file(tmp_path / "train.jsonl")
    fails(capsys, ["split-by-length", "--input_path", data, "--output_dir", tmp_path / "b", "--model_name_or_path",
                   splade_tiny_dir], f"{data}:3: (line): not UTF-8", inputs=[data], absent=[tmp_path / "b"])


def test_curation_file_not_utf8_names_file_and_line(tmp_path, splade_tiny_dir, capsys):
    data = not_utf8_file(tmp_path / "train.jsonl")
    out = tmp_path / "out.jsonl"
    model = ["--model_name_or_path", splade_tiny_dir, "--quiet"]
    fails(capsys, ["filter", "--input_file", data, "--output_file", out], f"{data}:3: (line): not UTF-8",
          inputs=[data], absent=[out])
    fails(capsys, ["score", "--input_file", data, "--output_file", out, *model], f"{data}:3: (line): not UTF-8",
          inputs=[data], absent=[out])
    fails(capsys, ["mine", "--input_file", data, "--output_file", out, *model], f"{data}:3: (line): not UTF-8",
          inputs=[data], absent=[out])
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    fails(capsys, ["mine", "--input_file", jsonl(tmp_path / "good.jsonl", GOOD), "--output_file", out, *model,
                   "--candidate_pool", pool], f"{pool}:2: (line): not UTF-8", inputs=[pool], absent=[out])


def beir(folder, corpus=None, qrels="q1\td1\t1\n"):
    folder.mkdir()
    (folder / "qrels").mkdir()
    corpus = corpus if corpus is not None else [{"_id": "d1", "text": "chmod changes file mode bits"},
                                                {"_id": "d2", "text": "malloc allocates memory"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "change file mode"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder


def test_eval_data_errors(tmp_path, splade_tiny_dir, capsys):
    model = ["--model", splade_tiny_dir, "--heads", "neutral", "--quiet", "--out", tmp_path / "report"]
    data = beir(tmp_path / "missing-doc", qrels="q1\td9\t1\n")
    fails(capsys, ["eval", "--data", data, *model],
          f"{data / 'qrels' / 'test.tsv'}:2: field 'corpus-id': document 'd9' is not in the corpus",
          inputs=[data], absent=[tmp_path / "report"])
    data = beir(tmp_path / "duplicate", corpus=[{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    fails(capsys, ["eval", "--data", data, *model], f"{data / 'corpus.jsonl'}:2: field '_id': duplicate id 'd1'",
          inputs=[data], absent=[tmp_path / "report"])
    data = beir(tmp_path / "latin1")
    with open(data / "corpus.jsonl", "ab") as f:
        f.write(b'{"_id": "d3", "text": "caf\xe9"}\n')
    fails(capsys, ["eval", "--data", data, *model], f"{data / 'corpus.jsonl'}:3: not UTF-8", inputs=[data],
          absent=[tmp_path / "report"])


def test_truncated_model_weights_are_named(tmp_path, splade_tiny_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(splade_tiny_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    data = beir(tmp_path / "data")
    fails(capsys, ["eval", "--data", data, "--model", model, "--heads", "neutral", "--quiet"],
          f"{weights}: cannot load the model", inputs=[model, data])


def test_garbage_head_file_is_named(tmp_path, splade_tiny_dir, capsys):
    model = tmp_path / "model"
    TriHeadModel.from_pretrained(splade_tiny_dir, init_missing_heads="neutral").save_pretrained(model)
    head = model / "colbert_linear.pt"
    head.write_bytes(b"not a pytorch file at all")
    data = beir(tmp_path / "data")
    line = fails(capsys, ["eval", "--data", data, "--model", model, "--quiet"], f"{head}: cannot read the weights",
                 inputs=[model, data])
    assert "weights_only" not in line
    with pytest.raises(InputError, match="colbert_linear.pt: cannot read"):
        M3Embedder(model)


def test_missing_model_folder_is_not_a_hub_id(tmp_path, capsys):
    data = jsonl(tmp_path / "train.jsonl", GOOD)
    missing = tmp_path / "no-such-model"
    line = fails(capsys, ["split-by-length", "--input_path", data, "--output_dir", tmp_path / "b",
                          "--model_name_or_path", missing], f"{missing}: no such model folder",
                 inputs=[data], absent=[tmp_path / "b"])
    assert "internet" not in line.lower()
    fails(capsys, ["eval", "--data", beir(tmp_path / "data"), "--model", missing], f"{missing}: no such model folder")


def test_split_by_length_empty_file(tmp_path, splade_tiny_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails(capsys, ["split-by-length", "--input_path", empty, "--output_dir", tmp_path / "b", "--model_name_or_path",
                   splade_tiny_dir], f"{empty}: no records", inputs=[empty], absent=[tmp_path / "b"])


def test_bad_options_of_argparse_commands_exit_2(tmp_path, splade_tiny_dir, capsys):
    data = jsonl(tmp_path / "train.jsonl", GOOD)
    fails(capsys, ["mine", "--input_file", data, "--output_file", tmp_path / "o.jsonl", "--model_name_or_path",
                   splade_tiny_dir, "--batch_size", "0"], "batch_size must be a positive integer, got 0",
          inputs=[data], absent=[tmp_path / "o.jsonl"])
    fails(capsys, ["eval", "--data", beir(tmp_path / "data"), "--modes", "dense,fast"], "unknown modes ['fast']")
    fails(capsys, ["mine", "--input_file", data, "--output_file", tmp_path / "o.jsonl", "--model_name_or_path", "m",
                   "--hybrid_weights", "1"], "--hybrid_weights takes two numbers", inputs=[data],
          absent=[tmp_path / "o.jsonl"])
    fails(capsys, ["filter", "--input_file", data, "--output_file", tmp_path / "o.jsonl", "--min_score", "0.5"],
          "--min_score, --top_k and --near_duplicate_threshold need --model_name_or_path")


def test_debug_log_level_shows_the_traceback(tmp_path, splade_tiny_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["--log-level", "DEBUG", "split-by-length", "--input_path", str(empty), "--output_dir",
            str(tmp_path / "b"), "--model_name_or_path", splade_tiny_dir]
    with pytest.raises(UserError, match="no records"):
        main(argv)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: fast\n")
    with pytest.raises(OptionError, match="learning_rate: expected a number"):
        main(["--log-level", "DEBUG", "finetune", str(cfg)])
    logging.getLogger().setLevel(logging.WARNING)


def test_python_dash_m_trine(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.jsonl"
    monkeypatch.setattr(sys, "argv", ["trine", "filter", "--input_file", str(missing), "--output_file",
                                      str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("trine", run_name="__main__")  # what `python -m trine ...` runs
    assert done.value.code == 2
    assert f"error: {missing}: cannot open: No such file or directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 9. library edges
@pytest.fixture(scope="module")
def m3(tiny_m3_dir):
    return M3Embedder(tiny_m3_dir, show_progress=False, devices="cpu")


def test_batch_size_zero_or_negative_is_an_error(m3, splade_tiny_dir):
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad}"):
            m3.encode(["a text"], batch_size=bad)
    m3.max_tokens_per_batch = None  # no token budget: the path that failed with "max() arg is an empty sequence"
    try:
        with pytest.raises(ValueError, match="batch_size"):
            m3.encode(["a text", "another"], batch_size=0)
    finally:
        m3.max_tokens_per_batch = "auto"
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(splade_tiny_dir, batch_size=0)


def test_max_length_zero_or_beyond_the_positions_is_an_error(m3):
    assert m3.model.max_positions == 512  # XLM-R: 514 position rows, the first two are not positions
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        m3.encode(["a text"], max_length=0)
    with pytest.raises(ValueError, match="max_length 600 is more than the model's 512 positions"):
        m3.encode(["a text"], max_length=600)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        m3.encode_queries(["q"], max_length=0)  # 0 is not "the default query length"
    assert len(m3.encode(["x " * 1000], max_length=512)["dense_vecs"]) == 1  # the limit itself is fine


def test_mode_weights_never_give_nan(m3):
    pairs = [("change file mode", "chmod changes the file mode bits"), ("memory", "malloc allocates memory")]
    for bad in ([0, 0, 0], [0, 0, 1], [1, -1, 1], [1, float("nan"), 1]):
        with pytest.raises(ValueError, match="weights_for_different_modes"):
            m3.compute_score(pairs, weights_for_different_modes=bad)
    scores = m3.compute_score(pairs, weights_for_different_modes=[1, 0, 0])
    assert all(np.isfinite(v).all() for v in scores.values())
    np.testing.assert_allclose(scores["sparse+dense"], scores["dense"])


def test_encode_names_the_item_that_is_not_a_string(m3):
    with pytest.raises(ValueError, match=r"sentences\[1\] must be a string, got NoneType"):
        m3.encode(["a text", None, "another"])
    with pytest.raises(ValueError, match="sentences must be a string or a list of strings"):
        m3.encode(None)


def test_reranker_arguments(tmp_path, splade_tiny_dir):
    from conftest import make_tiny_reranker

    folder = make_tiny_reranker(str(tmp_path / "rr"), splade_tiny_dir, "bert")
    with pytest.raises(ValueError, match="max_length 1000 is more than the model's 512 positions"):
        Reranker(folder, max_length=1000)
    rr = Reranker(folder, show_progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        rr.compute_score([("q", "p")], batch_size=0)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        rr.compute_score([("q", "p")], max_length=0)
    assert len(rr.compute_score([("q", "p")], max_length=64)) == 1


def test_scoring_checks_its_arguments():
    with pytest.raises(ValueError, match="vecs is empty"):
        scoring.pad_vectors([])
    with pytest.raises(ValueError, match="one dim"):
        scoring.colbert_score(np.ones((2, 4)), np.ones((3, 5)))
    assert scoring.check_mode_weights(None) == (1.0, 1.0, 1.0)


def test_manpages_never_run_apt_get_update_unasked(tmp_path, monkeypatch, caplog):
    from trine.datasets import manpages

    calls = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        if cmd[:2] == ["apt-get", "update"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package manpages")

    monkeypatch.setattr(manpages.subprocess, "run", fake_run)
    monkeypatch.setattr(manpages.os, "geteuid", lambda: 0, raising=False)
    monkeypatch.delenv(manpages.APT_UPDATE_ENV, raising=False)
    with pytest.raises(RuntimeError, match="run `apt-get update -qq` as root once"):
        manpages.load_manpages(str(tmp_path / "cache"))
    assert calls == [["apt-get", "download", *manpages.PACKAGES]]  # as root too: no update unasked
    calls.clear()
    monkeypatch.setenv(manpages.APT_UPDATE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="trine.datasets.manpages"), pytest.raises(RuntimeError):
        manpages.load_manpages(str(tmp_path / "cache"))  # asked: update, then the download again (fails here)
    assert calls == [["apt-get", "download", *manpages.PACKAGES], ["apt-get", "update", "-qq"],
                     ["apt-get", "download", *manpages.PACKAGES]]
    assert "running `apt-get update -qq`" in caplog.text
    monkeypatch.setattr(manpages.os, "geteuid", lambda: 1000, raising=False)
    with pytest.raises(RuntimeError, match="needs root: run `sudo apt-get update -qq`"):
        manpages.load_manpages(str(tmp_path / "cache"), update_package_lists=True)


def test_eval_batch_size_zero_is_an_option_error(capsys):
    from trine.cli import main

    assert main(["eval", "--data", "/nonexistent", "--batch-size", "0"]) == 2
    assert "batch_size must be a positive integer" in capsys.readouterr().err


def test_a_build_time_value_error_exits_2(tmp_path, capsys, splade_tiny_dir):
    from test_finetune import common_args, write_data

    from trine.cli import main

    data = write_data(tmp_path / "train.jsonl")
    rc = main(["finetune", *common_args(splade_tiny_dir, data, tmp_path / "out", retrieval_eval_steps=2)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "retrieval_eval_steps needs eval_data" in err and "Traceback" not in err


def test_retromae_names_a_missing_or_broken_folder(tmp_path):
    from trine.errors import InputError
    from trine.modeling.retromae import RetroMAEModel

    with pytest.raises(FileNotFoundError, match="no such model folder"):
        RetroMAEModel.from_pretrained(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="broken"):
        RetroMAEModel.from_pretrained(str(broken))


def test_default_lengths_fit_a_model_with_fewer_positions(tmp_path, splade_tiny_dir):
    """Not giving a length takes 512 or the model's positions, whichever is smaller; giving one
    beyond the positions is an error naming it."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from trine import Embedder, Reranker

    small = tmp_path / "small"
    AutoTokenizer.from_pretrained(splade_tiny_dir).save_pretrained(small)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(small)
    emb = Embedder(str(small), show_progress=False, devices="cpu")
    assert emb.passage_max_length == emb.query_max_length == 64
    assert emb.encode(["chmod " * 200]).shape == (1, 32)  # a long text is cut to the positions
    with pytest.raises(ValueError, match="passage_max_length 65 is more than the model's 64 positions"):
        Embedder(str(small), passage_max_length=65, devices="cpu")
    from transformers import BertForSequenceClassification

    rr = tmp_path / "rr"
    AutoTokenizer.from_pretrained(splade_tiny_dir).save_pretrained(rr)
    BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 1})).save_pretrained(rr)
    assert Reranker(str(rr), show_progress=False, devices="cpu").max_length == 64
