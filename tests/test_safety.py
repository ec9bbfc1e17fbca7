"""Never lose a user's data: the output-path policy, atomic folders and checkpoints, resume after a kill.

Each case of issue 13 is reproduced as a user would meet it: the command exits 2 with one line
naming the path, and every input is intact afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import to_argv
from safetensors.torch import load_file
from test_finetune import common_args, write_data

from trine.cli import main
from trine.errors import OutputPathError
from trine.io import MARKER, atomic_file, atomic_folder, check_output_path, is_trine_folder


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def error_line(capsys) -> str:
    """The one ``error: ...`` line a refused command printed (progress bars may precede it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def beir_folder(path) -> str:
    """A tiny BEIR test set (hand-written, so nothing is read from Debian here)."""
    os.makedirs(os.path.join(path, "qrels"))
    docs = {"d1": "chmod changes file mode bits", "d2": "malloc allocates memory", "d3": "ls lists a directory"}
    with open(os.path.join(path, "corpus.jsonl"), "w") as f:
        for i, t in docs.items():
            f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
    with open(os.path.join(path, "queries.jsonl"), "w") as f:
        for i, t in (("q1", "change mode"), ("q2", "allocate memory")):
            f.write(json.dumps({"_id": i, "text": t}) + "\n")
    with open(os.path.join(path, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return str(path)


# ------------------------------------------------------------------------------------ the policy
def test_policy_refuses_inputs_cwd_ancestors_foreign_folders_and_links(tmp_path, monkeypatch):
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "proj")
    cases = {
        str(data / "train.jsonl"): "replace the input",
        str(tmp_path / "proj"): "working folder",
        ".": "working folder",
        str(tmp_path): "working folder",
    }
    for out, message in cases.items():
        with pytest.raises(OutputPathError, match=message):
            check_output_path(out, inputs=[str(data / "train.jsonl")], overwrite=True)
    with pytest.raises(OutputPathError, match="contains the input"):
        check_output_path(str(data), inputs=[str(data / "train.jsonl")], overwrite=True)
    with pytest.raises(OutputPathError, match="did not write"):  # never, even with overwrite
        check_output_path(str(data), overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputPathError, match="symbolic link"):
        check_output_path(str(link))
    # the same file through another spelling is still the input
    with pytest.raises(OutputPathError, match="replace the input"):
        check_output_path("./data/../data/train.jsonl", inputs=["data/train.jsonl"], kind="file")
    assert (data / "train.jsonl").read_text() == "{}\n"


def test_atomic_folder_needs_overwrite_and_never_mixes(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        open(os.path.join(tmp, "old.txt"), "w").write("old")
    assert is_trine_folder(out)
    with pytest.raises(OutputPathError, match="--overwrite"):
        with atomic_folder(out) as tmp:
            raise AssertionError("the check comes before the body")
    with atomic_folder(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(out)) == sorted([MARKER, "new.txt"])  # replaced whole: old.txt is gone
    # a failure inside (a full disk, a crash) leaves the old folder as it was and no temp behind
    with pytest.raises(OSError):
        with atomic_folder(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("{}")
            raise OSError(28, "No space left on device")
    assert sorted(os.listdir(out)) == sorted([MARKER, "new.txt"])
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []


def test_two_writers_take_turns(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(OutputPathError, match="--overwrite"):
        with atomic_folder(out) as first:
            open(os.path.join(first, "a"), "w").write("first")
            with atomic_folder(out) as second:  # finishes while the first is still writing
                open(os.path.join(second, "b"), "w").write("second")
    assert sorted(os.listdir(out)) == [MARKER, "b"]  # the finished result is kept
    with atomic_folder(out, overwrite=True) as first:
        open(os.path.join(first, "a"), "w").write("first")
        with atomic_folder(out, overwrite=True) as second:
            open(os.path.join(second, "b"), "w").write("second")
    assert sorted(os.listdir(out)) == [MARKER, "a"]  # both succeed in turn
    # a content-addressed entry (the embedding cache): the second writer keeps the first's
    entry = tmp_path / "cache" / "key"
    with atomic_folder(entry, if_exists="keep") as first:
        open(os.path.join(first, "v"), "w").write("1")
        with atomic_folder(entry, if_exists="keep") as second:
            open(os.path.join(second, "v"), "w").write("2")
    assert (entry / "v").read_text() == "2"
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_dir = tmp_path / f".tmp-out-{pid}-abc123"
    stale_dir.mkdir()
    stale_file = tmp_path / f".tmp-x.jsonl-{pid}-zz9"
    stale_file.write_text("half")
    alive = tmp_path / f".tmp-out-{os.getppid()}-keep1"  # a live writer's temp is left alone
    alive.mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        open(os.path.join(tmp, "f"), "w").write("x")
    with atomic_file(tmp_path / "x.jsonl") as f:
        f.write("{}\n")
    assert not stale_dir.exists() and not stale_file.exists() and alive.exists()


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            open(os.path.join(tmp, "f"), "w").write("x")
        with atomic_file(tmp_path / "x.jsonl") as f:
            f.write("{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "f").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "x.jsonl").st_mode) == 0o644


def test_a_saved_model_is_readable_by_others(tmp_path, tiny_m3_dir):
    from trine import TriHeadModel

    old = os.umask(0o022)
    try:
        TriHeadModel.from_pretrained(tiny_m3_dir).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path / "m"):
        mode = stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode)
        assert mode in (0o644, 0o755), (name, oct(mode))  # model.safetensors arrives 0600 from transformers


# ------------------------------------------------------------------------------ the commands
def test_eval_out_never_deletes_the_test_set_or_the_working_folder(tmp_path, monkeypatch, capsys, splade_tiny_dir):
    data = beir_folder(tmp_path / "beir")
    before = snapshot(data)
    base = ["eval", "--data", data, "--model", splade_tiny_dir, "--heads", "neutral", "--modes", "dense",
            "--k", "1", "--top-k", "3", "--quiet"]
    assert main([*base, "--out", data]) == 2
    assert data in error_line(capsys)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main([*base, "--out", "."]) == 2
    assert "working folder" in error_line(capsys)
    assert main([*base, "--out", str(tmp_path)]) == 2  # an ancestor of the data and of the working folder
    error_line(capsys)
    assert snapshot(data) == before and (work / "notes.txt").read_text() == "mine"
    # a new folder works; writing it again needs --overwrite, which replaces it whole
    assert main([*base, "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "report")]) == 2
    assert "--overwrite" in error_line(capsys)
    assert main([*base, "--out", str(tmp_path / "report"), "--overwrite"]) == 0


def test_split_by_length_never_deletes_its_input_folder(tmp_path, capsys, splade_tiny_dir):
    project = tmp_path / "P"
    (project / "data").mkdir(parents=True)
    write_data(project / "data" / "train.jsonl")
    (project / "README").write_text("keep me")
    before = snapshot(project)
    rc = main(["split-by-length", "--input_path", str(project / "data" / "train.jsonl"), "--output_dir",
               str(project), "--model_name_or_path", splade_tiny_dir])
    assert rc == 2 and str(project) in error_line(capsys)
    assert snapshot(project) == before


def test_manpages_data_never_replaces_a_foreign_folder(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        assert main(["manpages-data", str(folder), *extra]) == 2
        assert "did not write" in error_line(capsys)
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_pretrain_encoder_output_never_replaces_the_corpus(tmp_path, capsys, splade_tiny_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "chmod changes file mode bits"}) + "\n")
    before = snapshot(corpus)
    rc = main(["pretrain", *to_argv({"model_name_or_path": splade_tiny_dir, "train_data": [str(corpus)],
                                     "output_dir": str(tmp_path / "out"), "encoder_output_dir": str(corpus),
                                     "max_steps": 1, "report_to": "none", "use_cpu": True})])
    assert rc == 2 and str(corpus) in error_line(capsys)
    assert snapshot(corpus) == before


def test_curation_outputs_never_replace_an_input(tmp_path, capsys, minilm_dir):
    data = write_data(tmp_path / "train.jsonl")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a b c", "d e f", "g h i")))
    before = pool.read_bytes()
    rc = main(["mine", "--input_file", data, "--output_file", str(pool), "--candidate_pool", str(pool),
               "--model_name_or_path", minilm_dir, "--quiet"])
    assert rc == 2 and str(pool) in error_line(capsys)
    assert pool.read_bytes() == before
    out = tmp_path / "f.jsonl"
    rc = main(["filter", "--input_file", data, "--output_file", str(out), "--dropped_file",
               os.path.join(".", os.path.relpath(out)), "--quiet"])
    assert rc == 2 and "same file" in error_line(capsys)
    assert not out.exists()
    link = tmp_path / "linked.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    rc = main(["filter", "--input_file", data, "--output_file", str(link), "--quiet"])
    assert rc == 2 and "symbolic link" in error_line(capsys)
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []


# ------------------------------------------------------------------------------------- training
def finetune_cli(argv: list[str]) -> int:
    return main(["finetune", *argv])


def test_a_second_training_run_never_mixes_with_the_first(tmp_path, capsys, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    assert finetune_cli(common_args(splade_tiny_dir, data, out, training_mode="unified", max_steps=2,
                                    save_steps=100, init_missing_heads="neutral")) == 0
    assert (out / "colbert_linear.pt").exists() and is_trine_folder(out)
    before = snapshot(out)
    # a dense run into the same folder: refused without --overwrite_output_dir, nothing touched
    assert finetune_cli(common_args(splade_tiny_dir, data, out, max_steps=2, save_steps=100)) == 2
    assert "overwrite" in error_line(capsys)
    assert snapshot(out) == before
    # with it, the folder is replaced whole: no head files of the unified run remain
    assert finetune_cli(common_args(splade_tiny_dir, data, out, max_steps=2, save_steps=100,
                                    overwrite_output_dir=True)) == 0
    assert not (out / "colbert_linear.pt").exists() and not (out / "sparse_linear.pt").exists()
    # the model itself is never an acceptable output_dir
    assert finetune_cli(common_args(str(out), data, out, max_steps=1, overwrite_output_dir=True)) == 2
    assert "replace the input" in error_line(capsys)


def test_reranker_training_into_an_embedder_folder_leaves_nothing_of_it(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    assert finetune_cli(common_args(splade_tiny_dir, data, out, max_steps=1, save_steps=100)) == 0
    assert main(["finetune-reranker", *to_argv({
        "model_name_or_path": splade_tiny_dir, "train_data": [data], "output_dir": str(out), "train_group_size": 2,
        "per_device_train_batch_size": 2, "query_max_len": 16, "passage_max_len": 32, "max_steps": 1,
        "report_to": "none", "use_cpu": True, "overwrite_output_dir": True})]) == 0
    left = set(os.listdir(out))
    assert not left & {"modules.json", "1_Pooling", "colbert_linear.pt", "sparse_linear.pt"}, left


def test_resume_true_on_the_command_line_is_a_boolean(tmp_path, capsys, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    rc = finetune_cli(common_args(splade_tiny_dir, data, out, resume_from_checkpoint="True"))
    assert rc == 2
    err = error_line(capsys)
    # read as a boolean (the newest checkpoint), not as a folder named "True"
    assert "no complete checkpoint" in err and "not a checkpoint folder" not in err


KILLER = textwrap.dedent("""
    import os, signal, sys
    from trine.training import trainer as T

    point, argv = sys.argv[1], sys.argv[2:]
    if point == "checkpoint":  # the second checkpoint: model written, optimizer and RNG states not yet
        real = T.EmbedderTrainer._save_optimizer_and_scheduler
        calls = []
        def hook(self, output_dir):
            calls.append(output_dir)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, output_dir)
        T.EmbedderTrainer._save_optimizer_and_scheduler = hook
    elif point == "final":  # the final model half-written
        real = T.EmbedderTrainer._save
        def hook(self, output_dir=None, state_dict=None):
            if ".tmp-" in os.path.basename(output_dir or ""):
                model = self.accelerator.unwrap_model(self.model)
                model.encoder.backbone.config.save_pretrained(output_dir)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, output_dir, state_dict)
        T.EmbedderTrainer._save = hook
    from trine.cli import main
    sys.exit(main(["finetune", *argv]))
""")


@pytest.mark.parametrize("point", ["checkpoint", "final"])
def test_killed_during_a_save_then_resumed_equals_an_uninterrupted_run(tmp_path, splade_tiny_dir, point):
    data = write_data(tmp_path / "train.jsonl")
    full = tmp_path / "full"
    assert finetune_cli(common_args(splade_tiny_dir, data, full, save_steps=2)) == 0
    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, str(script), point, *common_args(splade_tiny_dir, data, out, save_steps=2)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if point == "checkpoint":
        assert sorted(e for e in os.listdir(out) if e.startswith("checkpoint-")) == ["checkpoint-2"]
    else:
        assert not (out / "model.safetensors").exists()  # the half-written model never reached the folder
    assert finetune_cli(common_args(splade_tiny_dir, data, out, save_steps=2, resume_from_checkpoint=True)) == 0
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    assert not [e for e in os.listdir(out) if e.startswith(".tmp")]
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".tmp")]
