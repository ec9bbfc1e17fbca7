"""benchmarks/heads.py's package-description set and the demo recipe's parts it reuses (no training here)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
from conftest import unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_heads():
    spec = importlib.util.spec_from_file_location("bench_heads", os.path.join(ROOT, "benchmarks", "heads.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the layout of Debian's Translation-en: synopsis on the Description-en line, the long description
# indented below it, " ." between paragraphs
TRANSLATION = """Package: acme
Description-md5: 1
Description-en: Multi-platform cross assembler for 6502/6510/65816 CPU
 This is a cross assembler that can produce code for the following
 processors: 6502, 6510 and 65816.
 .
 Calculations can be done in integer or float mode. Oh, and it is fast.

Package: tiny
Description-md5: 2
Description-en: a package with almost nothing to say
 Too short.

Package: twin-a
Description-md5: 3
Description-en: first of two packages sharing one long description
 The same long description is shared by two packages here, so a query for either would have two right answers.

Package: twin-b
Description-md5: 4
Description-en: second of two packages sharing one long description
 The same long description  is shared by two packages here, so a query for either would have two right answers.

Package: lonely
Description-md5: 5
Description-en: a package whose long description is its own
 Nothing else in this list says these words in this order, so this package stays in the data set.
"""


def test_translations_parse_into_synopsis_and_paragraphs():
    heads = load_heads()
    records = heads.parse_translations(TRANSLATION)
    assert [r[0] for r in records] == ["acme", "tiny", "twin-a", "twin-b", "lonely"]
    name, synopsis, body = records[0]
    assert synopsis == "Multi-platform cross assembler for 6502/6510/65816 CPU"
    assert body == ("This is a cross assembler that can produce code for the following processors: 6502, 6510 "
                    "and 65816.\nCalculations can be done in integer or float mode. Oh, and it is fast.")


def test_selection_drops_near_empty_and_shared_descriptions():
    """Both packages of a shared description go (spacing ignored): keeping one would still be right, but
    which one is arbitrary; short ones go too."""
    heads = load_heads()
    kept = heads.select_packages(heads.parse_translations(TRANSLATION))
    assert [r[0] for r in kept] == ["acme", "lonely"]


def test_debian_set_splits_are_disjoint_and_sized(tmp_path, monkeypatch):
    """The BEIR folder from a synthetic Translation-en: 5,000 documents, each query's own description its
    only relevant document, train/dev/test queries disjoint, the same split on a rebuild (seeded)."""
    heads = load_heads()
    words = [f"w{i}" for i in range(400)]
    stanzas = []
    for i in range(5200):
        body = " ".join(words[(i * 7 + k * 13) % 400] for k in range(20)) + f" id{i}"
        stanzas.append(f"Package: p{i:05d}\nDescription-md5: {i}\nDescription-en: synopsis of p{i}\n {body}\n")
    lists = tmp_path / "lists"
    lists.mkdir()
    plain = tmp_path / "t.txt"
    plain.write_text("\n".join(stanzas))
    if shutil.which("lz4") is None:
        unavailable("needs the lz4 tool (apt-get install lz4)")
    subprocess.run(["lz4", "-q", str(plain), str(lists / heads.TRANSLATION)], check=True)
    monkeypatch.setattr(heads, "CACHE", str(tmp_path))
    os.rename(lists, tmp_path / "apt-lists")

    def read(folder):
        qrels = {}
        for split in ("train", "dev", "test"):
            lines = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
            qrels[split] = [tuple(line.split("\t")) for line in lines]
        return qrels

    folder = tmp_path / "beir"
    heads.build_debian_beir(str(folder))
    qrels = read(folder)
    assert {s: len(v) for s, v in qrels.items()} == {"train": 1920, "dev": 240, "test": 480}
    queries = {s: {q for q, _, _ in v} for s, v in qrels.items()}
    assert not queries["train"] & (queries["dev"] | queries["test"]) and not queries["dev"] & queries["test"]
    assert all(q == "q:" + d for v in qrels.values() for q, d, _ in v)
    corpus = [json.loads(line)["_id"] for line in (folder / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == len(set(corpus)) == 5000
    again = tmp_path / "beir2"
    heads.build_debian_beir(str(again))
    assert read(again) == qrels


def test_recipe_refuses_an_unknown_training_option(tmp_path):
    """A lever is a training argument: a misspelt one is an error before anything is loaded or trained."""
    from trine.demo import finetune_unified
    from trine.errors import OptionError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    with pytest.raises(OptionError, match="sparse_flops_wieght"):
        finetune_unified(str(tmp_path / "missing-model"), str(pairs), str(tmp_path / "out"),
                         train_options={"sparse_flops_wieght": 1e-3})
    assert not (tmp_path / "out").exists()


def test_parse_set_needs_name_and_value():
    heads = load_heads()
    assert heads.parse_set(["sparse_flops_weight=1e-3", "head_learning_rate=5e-4"]) == {
        "sparse_flops_weight": "1e-3", "head_learning_rate": "5e-4"}
    with pytest.raises(SystemExit, match="name=value"):
        heads.parse_set(["sparse_flops_weight"])
