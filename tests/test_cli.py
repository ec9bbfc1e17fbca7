"""One command line: both flag spellings everywhere, one YAML/JSON file instead of flags, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_safety import beir_folder

from trine.cli import build_parser, main
from trine.cli.parser import config_to_argv


def test_every_flag_takes_both_spellings():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        for action in command._actions:
            longs = [f for f in action.option_strings if f.startswith("--")]
            for flag in longs:
                body = flag[2:]
                if "_" in body:
                    assert "--" + body.replace("_", "-") in longs, (name, flag)
                if "-" in body:
                    assert "--" + body.replace("-", "_") in longs, (name, flag)


def test_flagembedding_names_are_canonical_in_eval():
    parser = build_parser()
    args = parser.parse_args(["eval", "--data", "d", "--query-max-length", "20", "--passage_max_len", "30",
                              "--device", "cpu"])
    assert (args.query_max_len, args.passage_max_len, args.devices) == (20, 30, "cpu")
    args = parser.parse_args(["mine", "--input-file", "a", "--output-file", "b", "--model-name-or-path", "m",
                              "--query-max-len", "9"])
    assert (args.input_file, args.query_max_len) == ("a", 9)


def test_a_config_file_is_the_same_as_flags(tmp_path, capsys, splade_tiny_dir):
    data = beir_folder(tmp_path / "beir")
    flags = ["eval", "--data", data, "--model", splade_tiny_dir, "--heads", "neutral", "--modes", "dense,sparse",
             "--k", "1,3", "--top-k", "3", "--quiet"]
    assert main(flags) == 0
    by_flags = capsys.readouterr().out
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {data}\nmodel: [{splade_tiny_dir}]\nheads: neutral\nmodes: dense,sparse\n"
                      "k: [1, 3]\ntop-k: 3\nquiet: true\n")
    assert main(["eval", str(config)]) == 0
    assert capsys.readouterr().out == by_flags
    (tmp_path / "eval.json").write_text(json.dumps({"data": data, "model": [splade_tiny_dir], "heads": "neutral",
                                                    "modes": "dense,sparse", "k": [1, 3], "top_k": 3,
                                                    "quiet": True}))
    assert main(["eval", str(tmp_path / "eval.json")]) == 0
    assert capsys.readouterr().out == by_flags


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    assert main(["eval", "--data", "d", "--top-k", "many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --top-k: expected an integer, got 'many'") and "usage" not in err
    assert main(["mine", "--input_file", "a", "--output_file", "b", "--model_name_or_path", "m", "--nope", "1"]) == 2
    assert "--nope" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("data: d\nquiet: maybe\ntopk: 3\n")
    assert main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:2: quiet: expected a boolean" in err and f"{config}:3: topk: unknown option" in err
    assert main(["--log-level", "LOUD", "eval", "--data", "d"]) == 2
    assert "--log-level" in capsys.readouterr().err


def test_config_keys_map_to_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["split-by-length"]
    import yaml

    path = "/tmp/trine-test-split.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({"input_path": ["a.jsonl", "b.jsonl"], "output-dir": "out", "model_name_or_path": "m",
                        "overwrite": True, "length_list": [0, 10]}, f)
    argv = config_to_argv(path, sub)
    args = parser.parse_args(["split-by-length", *argv])
    assert args.input_path == ["a.jsonl", "b.jsonl"] and args.length_list == [0, 10] and args.overwrite


def test_python_dash_m_trine_runs():
    out = subprocess.run([sys.executable, "-m", "trine", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "finetune" in out.stdout


@pytest.mark.parametrize("command", ["finetune", "finetune-reranker", "pretrain"])
def test_training_commands_take_kebab_case_flags(command, capsys):
    assert main([command, "--model-name-or-path", "/nonexistent/model", "--train-data", "x.jsonl",
                 "--output-dir", "/tmp/trine-never-written", "--learning-rate", "fast"]) == 2
    assert "--learning" in capsys.readouterr().err


def test_training_config_files_take_both_spellings(tmp_path):
    from trine.errors import OptionError
    from trine.training.finetune import parse_args

    config = tmp_path / "train.yaml"
    config.write_text("model-name-or-path: m\ntrain_data: [x.jsonl]\noutput-dir: out\nquery-max-len: 5\n"
                      "learning_rate: 1e-4\n")
    _, data, args = parse_args([str(config)])
    assert data.query_max_len == 5 and args.learning_rate == 1e-4 and args.output_dir == "out"
    config.write_text("model_name_or_path: m\ntrain_data: [x.jsonl]\noutput_dir: out\nquery-max-len: 5\n"
                      "query_max_len: 6\n")
    with pytest.raises(OptionError, match="given twice"):
        parse_args([str(config)])
