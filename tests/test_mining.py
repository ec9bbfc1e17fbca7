"""`trine mine` on real text: negatives come from the requested ranks, never a positive or the query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trine import Embedder
from trine.cli import main
from trine.curation.mining import mine_hard_negatives, parse_range
from trine.datasets.manpages import load_manpages
from trine.training.data import DataError, load_train_files


@pytest.fixture(scope="module")
def pages():
    try:
        return load_manpages()[:150]
    except RuntimeError as err:
        pytest.skip(f"man pages unavailable: {err}")


def write(path, pages):
    with open(path, "w") as f:
        for p in pages:
            f.write(json.dumps({"query": p.name, "pos": [p.description], "neg": [], "pos_scores": [1.0]}) + "\n")
    return str(path)


@pytest.mark.parametrize("margin", [None, 0.05])
def test_mined_negatives_respect_ranks_positives_and_margin(tmp_path, minilm_dir, pages, margin):
    src = write(tmp_path / "train.jsonl", pages)
    out = str(tmp_path / "mined.jsonl")
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=128)
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(2, 30), negative_number=5,
                                  relative_margin=margin, backfill="none")
    rows = [json.loads(line) for line in open(out)]
    assert [r["query"] for r in rows] == [p.name for p in pages]
    pool = list(dict.fromkeys(p.description for p in pages))
    corpus = emb.encode_corpus(pool)
    queries = emb.encode_queries([p.name for p in pages])
    for r, q in zip(rows, queries):
        scores = corpus @ q
        ranking = [pool[j] for j in np.argsort(-scores, kind="stable")]
        allowed = set(ranking[2:30])
        pos_score = float(scores[pool.index(r["pos"][0])])
        assert len(r["neg"]) <= 5 and len(set(r["neg"])) == len(r["neg"])
        for neg in r["neg"]:
            assert neg not in r["pos"] and neg != r["query"]
            assert neg in allowed
            if margin is not None:
                assert float(scores[pool.index(neg)]) <= (1 - margin) * pos_score + 1e-5
        assert "neg_scores" not in r and r["pos_scores"] == [1.0]
    if margin is not None:
        assert summary.dropped_by_margin > 0
    assert summary.dropped_as_positive_or_query > 0  # the positive is usually ranked within 2-30
    files = load_train_files([out], train_group_size=3, fill_missing_negatives="random")  # valid training data
    assert len(files[0].records) == len(pages)


def test_backfill_and_errors(tmp_path, minilm_dir, pages):
    src = write(tmp_path / "train.jsonl", pages[:20])
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=64)
    out = str(tmp_path / "mined.jsonl")
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(2, 5), negative_number=6, backfill="random")
    assert summary.backfilled > 0 and summary.short == 0
    assert all(len(json.loads(line)["neg"]) == 6 for line in open(out))
    with pytest.raises(DataError, match="only"):
        mine_hard_negatives(src, out, emb, range_for_sampling=(2, 5), negative_number=6, backfill="error")
    with pytest.raises(ValueError, match="overwrite the input"):
        mine_hard_negatives(src, src, emb)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q2"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: pos: missing"):
        mine_hard_negatives(str(bad), str(tmp_path / "o.jsonl"), emb)
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ValueError, match="2-100"):
        parse_range("2:100")


def test_cli_with_candidate_pool(tmp_path, minilm_dir, pages, capsys):
    src = write(tmp_path / "train.jsonl", pages[:30])
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": p.description}) + "\n" for p in pages[30:90]))
    out = tmp_path / "mined.jsonl"
    code = main(["mine", "--input_file", src, "--output_file", str(out), "--model_name_or_path", minilm_dir,
                 "--candidate_pool", str(pool), "--range_for_sampling", "0-20", "--negative_number", "3",
                 "--passage_max_len", "64"])
    assert code == 0
    others = {p.description for p in pages[30:90]}
    for line in open(out):
        assert set(json.loads(line)["neg"]) <= others
    assert "mined negative scores" in capsys.readouterr().out
