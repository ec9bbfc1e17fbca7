"""The front door: what ``import trine`` and ``trine --help`` load, ``trine`` alone, ``--version``,
"did you mean", the one flag vocabulary, and ``--quiet``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trine
from trine.cli import build_parser, main

SRC = str(Path(__file__).resolve().parent.parent / "src")
# Third-party top-level modules a bare `import trine` and `trine --help` may load (none: the
# standard library and trine only). `_distutils_hack` is setuptools' start-up hook, not ours.
MAY_LOAD = {"trine", "_distutils_hack", "__main__"}
HEAVY = ("torch", "transformers", "faiss", "fastapi", "uvicorn", "pymilvus", "qdrant_client", "ray", "peft",
         "numpy", "tqdm", "yaml", "huggingface_hub")


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    environment.pop("TQDM_DISABLE", None)
    environment.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    environment.pop("TRANSFORMERS_VERBOSITY", None)  # set by an earlier --quiet command run in this process
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=300)


def third_party_loaded(code: str) -> set[str]:
    done = run_python(code + "\nimport sys, json\nnames = {m.split('.')[0] for m in sys.modules}\n"
                      "print(json.dumps(sorted(names - set(sys.stdlib_module_names))))")
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_bare_import_loads_no_third_party_module():
    loaded = third_party_loaded("import trine")
    assert not loaded & set(HEAVY)
    assert loaded <= MAY_LOAD


def test_help_of_trine_and_every_command_loads_no_heavy_stack():
    code = """
import argparse, contextlib, io
from trine.cli import build_parser, main
commands = [[]]
parser = build_parser()
for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
        for name, sub in action.choices.items():
            if sub.add_help:  # the training commands' help is Hugging Face's parser (transformers)
                commands.append([name])
                for a in sub._actions:
                    if isinstance(a, argparse._SubParsersAction):
                        commands += [[name, nested] for nested in a.choices]
for words in commands:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*words, "--help"])
        except SystemExit as stop:
            assert stop.code == 0, words
    assert "usage: trine" in out.getvalue(), words
"""
    loaded = third_party_loaded(code)
    assert not loaded & set(HEAVY)
    assert loaded <= MAY_LOAD


def test_public_names_resolve_lazily():
    import trine.inference
    import trine.modeling
    import trine.retrieval

    for package in (trine, trine.inference, trine.modeling, trine.retrieval):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
        with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
            package.NoSuchName  # noqa: B018
    assert trine.M3Embedder is trine.inference.M3Embedder
    assert trine.scoring.NORMALIZATIONS == trine.modes.NORMALIZATIONS  # submodules as attributes
    assert trine.__version__ == "0.1.0"


def test_trine_alone_lists_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage: trine" in err
    for command in ("finetune", "eval", "encode", "serve", "mine", "index"):
        assert f"\n  {command} " in err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"trine {trine.__version__}"


def test_did_you_mean_for_a_command_and_a_flag(capsys):
    assert main(["finetne"]) == 2
    assert "finetne: unknown command (did you mean finetune?)" in capsys.readouterr().err
    assert main(["index", "biuld"]) == 2
    assert "biuld: unknown command (did you mean build?)" in capsys.readouterr().err
    # the typo is reported before the missing --data, with the closest flag (a swap is one edit)
    assert main(["eval", "--modle", "m"]) == 2
    assert "--modle: unknown option (did you mean --model?)" in capsys.readouterr().err
    assert main(["--versoin"]) == 2
    assert "(did you mean --version?)" in capsys.readouterr().err
    assert main(["eval", "--data", "d", "--heads", "bm52"]) == 2  # a value among an option's choices
    err = capsys.readouterr().err
    assert "--heads: invalid choice: 'bm52'" in err and "(did you mean bm25?)" in err
    assert main(["eval", "--zzzz"]) == 2
    assert "--zzzz: unknown option (see `trine eval --help`)" in capsys.readouterr().err


def test_did_you_mean_for_a_training_flag(capsys):
    assert main(["finetune", "--model_name_or_path", "m", "--train_data", "d", "--query_max_lne", "3"]) == 2
    err = capsys.readouterr().err
    assert "--query_max_lne: unknown option (did you mean --query_max_len?)" in err and "Traceback" not in err


def test_training_help_has_the_command_name_summary_and_trines_options_first(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first == "usage: trine finetune [options] | trine finetune CONFIG.yaml"
    assert "Contrastive fine-tuning" in out.split("options:")[0]
    ours, theirs = out.index("trine options:"), out.index("Trainer options (transformers.TrainingArguments):")
    assert ours < theirs
    assert out.index("--train_group_size") < theirs < out.index("--learning_rate")
    assert "(default: 64)" in out  # defaults shown (lora_rank)


def parse(*words: str) -> dict:
    return vars(build_parser().parse_args(list(words)))


def test_aliases_parse_to_the_same_namespace():
    # --model: positional, --model, --model_name_or_path
    positional = parse("encode", "m", "c.jsonl", "--output-dir", "o", "--no-progress")
    assert positional == parse("encode", "--model", "m", "c.jsonl", "--output_dir", "o", "--quiet")
    assert positional == parse("encode", "c.jsonl", "--model_name_or_path", "m", "--out", "o", "--no-progress")
    assert positional["model"] == "m" and positional["no_progress"] is True
    # mine's FlagEmbedding names and the shared vocabulary; --devices comma-separated or a list
    mine = ("mine", "--input_file", "i.jsonl", "--output_file", "o.jsonl")
    a = parse(*mine, "--model_name_or_path", "m", "--devices", "cpu", "cuda:1", "--quiet")
    b = parse(*mine, "--model", "m", "--devices", "cpu,cuda:1", "--no-progress")
    assert a == b and a["devices"] == ["cpu", "cuda:1"] and a["model_name_or_path"] == "m"
    # eval: --out / --output-dir; --heads / --init_missing_heads; one device stays a string
    e1 = parse("eval", "--data", "d", "--model", "m", "--out", "r", "--heads", "random", "--devices", "cpu")
    e2 = parse("eval", "--data", "d", "--model", "m", "--output-dir", "r", "--init_missing_heads", "random",
               "--devices", "cpu")
    assert e1 == e2 and e1["devices"] == "cpu" and e1["out"] == "r"
    # serve: --devices a,b where it was one string
    assert parse("serve", "m", "--devices", "cuda:0,cuda:1")["devices"] == ["cuda:0", "cuda:1"]


def test_model_given_twice_or_not_at_all_is_an_option_error(capsys):
    assert main(["encode", "m", "c.jsonl", "--model", "n", "--output-dir", "o"]) == 2
    assert "m: one positional word too many (given: --model n)" in capsys.readouterr().err
    assert main(["export", "--to", "onnx", "--output-dir", "o"]) == 2
    assert "required: model (or --model)" in capsys.readouterr().err
    # positional words are dealt out in order around the flags
    both = parse("export", "m", "o", "--to", "onnx")
    assert both == parse("export", "--model", "m", "o", "--to", "onnx") == parse("export", "m", "--out", "o",
                                                                                  "--to", "onnx")
    assert both["model"] == "m" and both["out"] == "o"


def test_every_option_has_help():
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif action.dest != "help" and not action.help:
                missing.append(f"{name} {action.option_strings or action.dest}")

    walk(build_parser(), "trine")
    assert not missing, missing


def test_quiet_is_on_every_command_and_calls_silence(monkeypatch, capsys):
    import trine.progress

    called = []
    monkeypatch.setattr(trine.progress, "silence", lambda: called.append(True))
    # the command fails on its missing input (exit 2) after --quiet has silenced the bars
    assert main(["merge-lora", "no-such-adapter", "o", "--quiet"]) == 2
    assert called == [True]
    assert main(["merge-lora", "no-such-adapter", "o"]) == 2
    assert called == [True]
    assert main(["encode", "no-such-model", "c.jsonl", "--output-dir", "o", "--no-progress"]) == 2
    assert called == [True, True]
    capsys.readouterr()


BARS = """
import sys
{silence}
import tqdm, huggingface_hub.utils, transformers.utils.logging as tl
from trine.progress import bar
for make in (bar, huggingface_hub.utils.tqdm, tl.tqdm, tqdm.tqdm):
    for _ in make(range(3), desc="BAR", file=sys.stderr, mininterval=0):
        pass
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_silence_quiets_trines_hubs_and_transformers_bars(when):
    loud = run_python(BARS.format(silence=""))
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.count("BAR") >= 4
    # silenced before the libraries are imported (the command line's case) or after
    code = BARS.format(silence="import trine.progress; trine.progress.silence()") if when == "before" else (
        # a tqdm class imported before reads TQDM_DISABLE no more: trine's, the Hub's and transformers' bars
        BARS.format(silence="").replace("from trine.progress import bar\n",
                                        "from trine.progress import bar, silence\nsilence()\n")
        .replace(", tqdm.tqdm)", ")"))
    quiet = run_python(code)
    assert quiet.returncode == 0, quiet.stderr
    assert "BAR" not in quiet.stderr


def test_library_keywords_become_the_commands_flags():
    from trine.config import command_line_words

    flags = {"--heads", "--init_missing_heads", "--init-missing-heads", "--hybrid_normalization", "--use_lora"}
    assert command_line_words("Pass init_missing_heads='random', 'neutral' or 'bm25' to start, or with_heads=False",
                              flags) == "Pass --heads random, neutral or bm25 to start, or with_heads=False"
    assert command_line_words("use hybrid_normalization='none'; use_lora=True; path=x", flags) == (
        "use --hybrid_normalization none; --use_lora; path=x")


def test_a_model_without_heads_is_told_about_the_heads_flag(splade_tiny_dir, tmp_path, capsys):
    data = tiny_beir(tmp_path / "ds")
    assert main(["eval", "--data", str(data), "--model", splade_tiny_dir, "--modes", "sparse", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Pass --heads random, neutral or bm25 to start new heads" in err and "init_missing_heads=" not in err


def test_training_commands_take_the_shared_vocabulary():
    from trine.training.finetuning import parse_args

    base = ["--train_data", "d.jsonl", "--output_dir", "o"]
    model_args, _, args = parse_args(["--model", "m", "--heads", "random", *base])
    old_model_args, _, old_args = parse_args(["--model_name_or_path", "m", "--init_missing_heads", "random", *base])
    assert model_args == old_model_args and model_args.model_name_or_path == "m"
    assert model_args.init_missing_heads == "random" and args.output_dir == old_args.output_dir == "o"


def tiny_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "the cat sat"}\n{"_id": "d2", "text": "dogs bark"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "cat"}\n')
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return root


def test_eval_shows_each_step_and_quiet_silences_every_bar(splade_tiny_dir, tmp_path):
    """A real `trine eval` in its own process: bars (transformers' weight loading, trine's encoding)
    and one line per phase; with --quiet none of them, the results table unchanged."""
    data = tiny_beir(tmp_path / "ds")
    argv = ["-m", "trine", "eval", "--data", str(data), "--model", splade_tiny_dir, "--modes", "dense,bm25"]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    loud = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run([sys.executable, *argv, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    for line in ("evaluating", "encoding 2 passages (dense)", "BM25 index of 2 passages", "encoding 1 queries",
                 "searching: dense", "searching: bm25", "scoring 2 modes", "Loading weights", "encode:", "LOAD REPORT"):
        assert line in loud.stderr, line  # "encode:": the bar (leave=False clears its last state)
    for word in ("evaluating", "encoding", "searching", "Loading weights", "encode:", "%|", "LOAD REPORT"):
        assert word not in quiet.stderr, word
    assert loud.stdout == quiet.stdout and "bm25" in quiet.stdout


def test_did_you_mean_in_config_files(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("data: d\ntopk: 3\n")
    assert main(["eval", str(config)]) == 2
    assert f"{config}:2: topk: unknown option (did you mean top_k?)" in capsys.readouterr().err
    train = tmp_path / "train.yaml"
    train.write_text("model_name_or_path: m\ntrain_data: [d.jsonl]\nquery_max_lenn: 3\n")
    assert main(["finetune", str(train)]) == 2
    assert f"{train}:3: query_max_lenn: unknown option (did you mean query_max_len?)" in capsys.readouterr().err
