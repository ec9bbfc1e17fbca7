"""`trine encode`: sharded, resumable corpus encoding (one process, torchrun, Ray) against in-process encoding."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TEXTS, require

from trine.cli import main
from trine.errors import InputError, OptionError, OutputPathError
from trine.inference import M3Embedder, encode_corpus, load_encoded
from trine.inference.shards import shard_name
from trine.partition import contiguous_bounds

OUTPUTS = ("dense", "sparse", "colbert")
DOCS = [(f"d{i}", "Title " + str(i) if i % 3 == 1 else "", t) for i, t in enumerate(TEXTS)] + [
    ("man-ls", "ls", "list directory contents"),
    ("42", "", "kill sends a signal to a process or a group of processes"),
]


def make_fast_m3(src: str, out: str, seed: int) -> str:
    """splade-tiny's 2-layer BERT (small vocabulary: loads in a fraction of a second) with BGE-M3 head
    files written by plain torch, so the tests can load it many times, and Ray's actor once more."""
    shutil.copytree(src, out)
    torch.manual_seed(seed)
    colbert, sparse = torch.nn.Linear(128, 16), torch.nn.Linear(128, 1)
    torch.nn.init.normal_(sparse.weight, std=0.5)
    torch.save(colbert.state_dict(), os.path.join(out, "colbert_linear.pt"))
    torch.save(sparse.state_dict(), os.path.join(out, "sparse_linear.pt"))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, splade_tiny_dir) -> str:
    return make_fast_m3(splade_tiny_dir, str(tmp_path_factory.mktemp("m3") / "model"), seed=0)


@pytest.fixture(scope="module")
def embedder(model_dir) -> M3Embedder:
    return M3Embedder(model_dir, show_progress=False)


def write_corpus(path, docs=DOCS) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, title, text in docs:
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    return str(path)


def reference(embedder: M3Embedder, outputs=OUTPUTS):
    """The independent reference: every passage (title + " " + text, as trine eval and FlagEmbedding
    encode a BEIR corpus) encoded in one in-process call."""
    passages = [f"{title} {text}" if title else text for _, title, text in DOCS]
    return [d[0] for d in DOCS], embedder.encode_result(passages, outputs, kind="passage")


def assert_same(loaded, ref_ids, ref, outputs=OUTPUTS) -> None:
    """Equal up to float noise: shards and blocks change which texts share a padded batch, which moves the
    last digits of float32 results (about 1e-6 relative), nothing more."""
    assert loaded.ids == ref_ids
    assert loaded.result.outputs == tuple(outputs)
    if "dense" in outputs:
        assert loaded.result.dense_vecs.dtype == np.float32
        np.testing.assert_allclose(loaded.result.dense_vecs, ref.dense_vecs, atol=1e-5)
    if "sparse" in outputs:
        assert sum(map(bool, ref.lexical_weights)) > len(DOCS) // 2  # the comparison is not of empty dicts
        for got, want in zip(loaded.result.lexical_weights, ref.lexical_weights, strict=True):
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4, atol=1e-5)
    if "colbert" in outputs:
        for got, want in zip(loaded.result.colbert_vecs, ref.colbert_vecs, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_one_shard_and_three_shards_equal_in_process_encoding(tmp_path, embedder, model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    ref_ids, ref = reference(embedder)
    one = encode_corpus(embedder, corpus, tmp_path / "one", outputs=OUTPUTS)
    three = encode_corpus(embedder, corpus, tmp_path / "three", outputs=OUTPUTS, num_shards=3, block_size=2)
    assert (one.encoded, three.encoded) == ([0], [0, 1, 2])
    assert sorted(os.listdir(tmp_path / "three")) == [".trine-output", "manifest.json",
                                                      *(shard_name(i, 3) for i in range(3))]
    assert_same(load_encoded(tmp_path / "one"), ref_ids, ref)
    assert_same(load_encoded(tmp_path / "three"), ref_ids, ref)
    assert_same(load_encoded(tmp_path / "three", outputs=("sparse",), embedder=embedder), ref_ids, ref, ("sparse",))
    with pytest.raises(InputError, match=r"three/manifest.json: encoded by another .*different: settings.max_length"):
        load_encoded(tmp_path / "three", embedder=M3Embedder(model_dir, passage_max_length=16))
    encode_corpus(embedder, corpus, tmp_path / "dense", outputs=("dense",))
    with pytest.raises(InputError, match="no colbert"):
        load_encoded(tmp_path / "dense", outputs=("dense", "colbert"))
    # match="model": the same weights with other passage options (queries go into the same space) are accepted,
    # and the corpus file must be the one encoded, byte for byte
    other_len = M3Embedder(model_dir, passage_max_length=16)
    assert_same(load_encoded(tmp_path / "three", embedder=other_len, match="model", corpus_file=corpus), ref_ids, ref)
    with pytest.raises(InputError, match=r"three/manifest.json: encoded by another .*different: model"):
        load_encoded(tmp_path / "three", embedder=M3Embedder(make_fast_m3(model_dir, str(tmp_path / "m2"), seed=1)),
                     match="model")
    with pytest.raises(InputError, match="different: settings.normalize_embeddings"):
        load_encoded(tmp_path / "three", embedder=M3Embedder(model_dir, normalize_embeddings=False), match="model")
    edited = write_corpus(tmp_path / "edited.jsonl", DOCS[:-1] + [("42", "", "kill sends a signal to a process")])
    with pytest.raises(InputError, match=r"edited.jsonl: not the corpus .*three was encoded from"):
        load_encoded(tmp_path / "three", corpus_file=edited)


def test_a_killed_run_is_resumed_finished_shards_skipped(tmp_path, embedder, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    plan = contiguous_bounds(len(DOCS), 3)
    calls: list[list[str]] = []
    real = embedder.encode_result

    def counting(texts, *args, **kwargs):
        calls.append(list(texts))
        if fail_at == len(calls):
            raise RuntimeError("killed")
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode_result", counting)
    fail_at = 2  # the first call of shard 1 (block_size covers a whole shard)
    with pytest.raises(RuntimeError, match="killed"):
        encode_corpus(embedder, corpus, out, outputs=OUTPUTS, num_shards=3)
    assert os.path.isfile(out / shard_name(0, 3) / "meta.json")
    assert not os.path.exists(out / shard_name(1, 3))
    with pytest.raises(InputError, match=r"2 of 3 shard\(s\) not finished"):
        load_encoded(out)
    # what a process killed outright leaves: its temp folder (a dead pid in the name; even a meta.json with the
    # right key does not make it a shard), and a shard folder without its meta.json
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = json.loads((out / "manifest.json").read_text())["key"]
    stale = out / f".tmp-{shard_name(1, 3)}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "dense.npy").write_bytes(b"\x93NUMPY partial")
    (stale / "meta.json").write_text(json.dumps({"key": key}))
    partial = out / shard_name(2, 3)
    partial.mkdir()
    (partial / ".trine-output").write_text("{}")
    (partial / "dense.npy").write_bytes(b"\x93NUMPY partial")
    finished = os.stat(out / shard_name(0, 3) / "meta.json").st_mtime_ns

    calls.clear()
    fail_at = None
    summary = encode_corpus(embedder, corpus, out, outputs=OUTPUTS, num_shards=3)
    assert (summary.skipped, summary.encoded) == ([0], [1, 2])
    passages = [f"{title} {text}" if title else text for _, title, text in DOCS]
    assert calls == [passages[plan[1][0]:plan[1][1]], passages[plan[2][0]:plan[2][1]]]  # shard 0 not encoded again
    assert os.stat(out / shard_name(0, 3) / "meta.json").st_mtime_ns == finished
    assert not stale.exists()
    monkeypatch.undo()
    assert_same(load_encoded(out), *reference(embedder))

    calls.clear()
    monkeypatch.setattr(embedder, "encode_result", counting)
    assert encode_corpus(embedder, corpus, out, outputs=OUTPUTS, num_shards=3).skipped == [0, 1, 2]
    assert calls == []


def test_other_model_corpus_or_options_are_refused(tmp_path, embedder, model_dir, splade_tiny_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    encode_corpus(embedder, corpus, out, outputs=("dense",), num_shards=2)
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(OutputPathError, match=r"manifest.json: .*\(different: outputs\)"):
        encode_corpus(embedder, corpus, out, outputs=("dense", "sparse"), num_shards=2)
    with pytest.raises(OutputPathError, match=r"\(different: shards\)"):
        encode_corpus(embedder, corpus, out, outputs=("dense",), num_shards=3)
    with pytest.raises(OutputPathError, match=r"\(different: settings.max_length\)"):
        encode_corpus(model_dir, corpus, out, outputs=("dense",), num_shards=2, passage_max_length=16,
                      show_progress=False)
    other = make_fast_m3(splade_tiny_dir, str(tmp_path / "other"), seed=1)  # same backbone, other heads
    with pytest.raises(OutputPathError, match=r"\(different: model\)"):
        encode_corpus(other, corpus, out, outputs=("dense",), num_shards=2, show_progress=False)
    write_corpus(corpus, DOCS[:-1] + [("42", "", "kill sends a signal")])
    with pytest.raises(OutputPathError, match=r"\(different: corpus.sha256\)"):
        encode_corpus(embedder, corpus, out, outputs=("dense",), num_shards=2)
    assert (out / "manifest.json").read_text() == manifest
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="trine did not write"):
        encode_corpus(embedder, corpus, mine)
    with pytest.raises(OutputPathError, match="replace the input"):
        encode_corpus(model_dir, corpus, model_dir)
    with pytest.raises(OptionError, match="more than the 10 documents"):
        encode_corpus(embedder, corpus, tmp_path / "many", num_shards=11)
    with pytest.raises(TypeError, match="colour"):
        encode_corpus(model_dir, corpus, tmp_path / "unknown", colour="blue")


def test_cli_shard_by_shard_and_bad_input(tmp_path, capsys, embedder, model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = str(tmp_path / "out")
    base = ["encode", model_dir, corpus, "--output-dir", out, "--outputs", "dense,sparse", "--num-shards", "2",
            "--no-progress"]
    assert main([*base, "--shard-id", "1"]) == 0
    assert "encoded here: 1, already finished: 0" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"1 of 2 shard\(s\) not finished \(shard-00000-of-00002\)"):
        load_encoded(out)
    config = tmp_path / "encode.yaml"
    config.write_text(f"model: {model_dir}\ncorpus: {corpus}\noutput_dir: {out}\noutputs: dense,sparse\n"
                      "num_shards: 2\nno_progress: true\n")
    assert main(["encode", str(config)]) == 0
    assert "encoded here: 1, already finished: 1" in capsys.readouterr().out
    assert_same(load_encoded(out), *reference(embedder, ("dense", "sparse")), ("dense", "sparse"))

    bad = tmp_path / "bad.jsonl"
    for lines, where in (([{"_id": "a", "text": "x"}, {"title": "t", "text": "y"}], r"bad.jsonl:2: field '_id'"),
                         ([{"_id": "a", "text": "x"}, {"_id": "b", "title": "t"}], r"bad.jsonl:2: field 'text'"),
                         ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], r"bad.jsonl:2: field 'id': duplicate"),
                         ([{"_id": "a", "text": 3}], r"bad.jsonl:1: field 'text' must be str")):
        bad.write_text("".join(json.dumps(line) + "\n" for line in lines))
        assert main(["encode", model_dir, str(bad), "--output-dir", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert re.search(where, err), err
    assert not os.path.exists(tmp_path / "never")
    assert main(["encode", model_dir, corpus, "--output-dir", out, "--ray-actors", "2"]) == 2
    assert "--ray-actors go with --ray" in capsys.readouterr().err
    assert main(["encode", model_dir, corpus, "--output-dir", out, "--outputs", "dense,lexical"]) == 2
    assert "unknown outputs ['lexical']" in capsys.readouterr().err


def test_ray_missing_names_the_extra(tmp_path, embedder, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    with pytest.raises(OptionError, match=r"pip install 'trine\[ray\]'"):
        encode_corpus(model_dir, corpus, tmp_path / "out", engine="ray", show_progress=False)
    with pytest.raises(OptionError, match="needs the model folder"):
        encode_corpus(embedder, corpus, tmp_path / "out", engine="ray")


def test_ray_actors_write_the_same_shards(tmp_path, capsys, embedder, model_dir):
    ray = require("ray")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = str(tmp_path / "ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        # batches of 4 rows over shards of 3, 3, 4: Ray's batches run across shard ends
        assert main(["encode", model_dir, corpus, "--output-dir", out, "--outputs", "dense,sparse,colbert",
                     "--num-shards", "3", "--block-size", "4", "--ray", "--no-progress"]) == 0
    finally:
        ray.shutdown()
    assert "encoded here: 3, already finished: 0" in capsys.readouterr().out
    assert_same(load_encoded(out), *reference(embedder))


def test_torchrun_two_ranks_share_the_shards(tmp_path, embedder, model_dir):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29300 + os.getpid() % 300), "-m", "trine", "encode", model_dir, corpus, "--output-dir", str(out),
         "--outputs", "dense,colbert", "--num-shards", "3", "--no-progress", "--devices", "cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoded here: 2, already finished: 0" in proc.stdout  # rank 0: shards 0 and 2; rank 1: shard 1
    assert_same(load_encoded(out), *reference(embedder, ("dense", "colbert")), ("dense", "colbert"))
