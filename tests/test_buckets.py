"""`trine split-by-length`: every record lands in the bucket of its longest text; nothing is lost."""

from __future__ import annotations

import json
import os

import pytest

from trine.cli import main
from trine.training.buckets import split_by_length, suggest_batch_size
from trine.training.data import load_train_files


def test_buckets_by_longest_text(tmp_path, splade_tiny_dir, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(splade_tiny_dir)
    rows = []
    for i in range(30):
        words = " ".join(["token"] * (i * 7))
        rows.append({"query": f"query {i}", "pos": [f"positive {i} {words}"], "neg": [f"negative {i}"]})
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "buckets"
    code = main(["split-by-length", "--input_path", str(src), "--output_dir", str(out), "--model_name_or_path",
                 splade_tiny_dir, "--length_list", "0", "50", "100", "--reference_batch", "64",
                 "--reference_length", "100"])
    assert code == 0
    files = sorted(f for f in os.listdir(out) if f.endswith(".jsonl"))
    assert files == ["train_len-0-50.jsonl", "train_len-100-inf.jsonl", "train_len-50-100.jsonl"]
    seen = []
    for name in files:
        lo, hi = name.split("_len-")[1][: -len(".jsonl")].split("-")
        for line in (out / name).read_text().splitlines():
            r = json.loads(line)
            longest = max(len(ids) for ids in tok([r["query"], *r["pos"], *r["neg"]])["input_ids"])
            assert int(lo) <= longest and (hi == "inf" or longest < int(hi))
            seen.append(r["query"])
    assert sorted(seen) == sorted(r["query"] for r in rows)
    load_train_files([str(out)], train_group_size=2)  # buckets are valid training data
    printed = capsys.readouterr().out
    assert "file_options" in printed and "train_len-0-50.jsonl" in printed
    log = json.loads((out / ".split_log.json").read_text())
    sizes = [b["suggested_batch_size"] for b in log[str(src)]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # longer buckets, smaller batches
    with pytest.raises(ValueError, match="contains the input"):
        split_by_length([str(out / files[0])], str(out), splade_tiny_dir)


def test_suggested_batch_sizes():
    assert suggest_batch_size(512, 32, 512) == 32
    assert suggest_batch_size(256, 32, 512) > 32
    assert suggest_batch_size(2048, 32, 512) < 8
