"""`trine filter`: drops exactly the records an independent computation expects, for each reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import unavailable

from trine import Embedder
from trine.cli import main
from trine.curation.filtering import filter_pairs, normalise
from trine.curation.teacher import EmbedderScorer
from trine.datasets.manpages import load_manpages
from trine.training.data import DataError, load_train_files


@pytest.fixture(scope="module")
def pages():
    try:
        return load_manpages(update_package_lists=True)[:40]
    except RuntimeError as err:
        unavailable(f"man pages unavailable: {err}")


@pytest.fixture(scope="module")
def emb(minilm_dir):
    return Embedder(minilm_dir, show_progress=False, passage_max_length=96, query_max_length=32)


def make_records(pages):
    """Real pairs, then: exact duplicates (case / spacing changed), near duplicates (punctuation added),
    and mismatched pairs (a page's NAME line with another page's DESCRIPTION)."""
    recs = [{"query": p.name, "pos": [p.description]} for p in pages[:30]]
    recs.append({"query": "  " + pages[3].name.upper() + " ", "pos": [pages[3].description.replace(" ", "  ")]})
    recs.append({"query": pages[5].name + "!", "pos": [pages[5].description + " ."]})
    recs += [{"query": pages[i].name, "pos": [pages[(i + 17) % 30].description]} for i in range(30, 36)]
    recs.append(dict(recs[0]))
    return recs


def write(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def expected_drops(recs, emb, min_score, threshold):
    """Reference: the documented rules, evaluated with plain loops over brute-force scores."""
    q = emb.encode_queries([r["query"] for r in recs])
    p = emb.encode_corpus([r["pos"][0] for r in recs])
    scores = np.einsum("nd,nd->n", q, p)
    qd, pd = emb.encode([r["query"] for r in recs]), emb.encode([r["pos"][0] for r in recs])
    seen, kept, reasons = set(), [], {}
    for i, r in enumerate(recs):
        key = (normalise(r["query"]), tuple(sorted({normalise(x) for x in r["pos"]})))
        if key in seen:
            reasons[i] = "duplicate"
        seen.add(key)
        if i in reasons:
            continue
        if min_score is not None and scores[i] < min_score:
            reasons[i] = "low_score"
            continue
        if threshold is not None and any(qd[i] @ qd[j] >= threshold and pd[i] @ pd[j] >= threshold for j in kept):
            reasons[i] = "near_duplicate"
            continue
        kept.append(i)
    return reasons, scores


def test_filter_drops_exactly_the_expected_records(tmp_path, emb, pages):
    recs = make_records(pages)
    src = write(tmp_path / "pairs.jsonl", recs)
    out, dropped = str(tmp_path / "kept.jsonl"), str(tmp_path / "dropped.jsonl")
    min_score, threshold = 0.3, 0.95
    reasons, scores = expected_drops(recs, emb, min_score, threshold)
    # the fixture exercises every reason
    assert {"duplicate", "low_score", "near_duplicate"} <= set(reasons.values())
    assert reasons.get(30) == "duplicate" and reasons.get(38) == "duplicate" and reasons.get(31) == "near_duplicate"
    summary = filter_pairs(src, out, scorer=EmbedderScorer(emb), min_score=min_score, dedup_embedder=emb,
                           near_duplicate_threshold=threshold, dropped_file=dropped, chunk_size=8,
                           show_progress=False)
    kept_rows = [json.loads(line) for line in open(out)]
    assert kept_rows == [r for i, r in enumerate(recs) if i not in reasons]
    drops = [json.loads(line) for line in open(dropped)]
    assert {d["line"] - 1: d["reason"] for d in drops} == reasons
    assert all(d["record"] == recs[d["line"] - 1] for d in drops)
    assert summary.kept == len(kept_rows) and sum(summary.dropped.values()) == len(reasons)
    for reason in set(reasons.values()):
        assert summary.dropped[reason] == list(reasons.values()).count(reason)
    low = [d for d in drops if d["reason"] == "low_score"]
    assert all(float(d["detail"].split()[2]) < min_score for d in low)
    load_train_files([out], train_group_size=1)  # valid training data


def test_rank_check(tmp_path, emb, pages):
    recs = make_records(pages)[:30] + make_records(pages)[32:38]  # 30 true pairs, then 6 mismatched ones
    src = write(tmp_path / "pairs.jsonl", recs)
    # top_k above the number of compared passages can never drop a record
    s = filter_pairs(src, str(tmp_path / "a.jsonl"), scorer=EmbedderScorer(emb), top_k=11, rank_sample_size=10,
                     dedup=False, show_progress=False)
    assert s.kept == len(recs)
    dropped = str(tmp_path / "d.jsonl")
    # more samples than other positives: every other distinct positive is compared, so ranks are exact
    s = filter_pairs(src, str(tmp_path / "b.jsonl"), scorer=EmbedderScorer(emb), top_k=2, rank_sample_size=100,
                     dropped_file=dropped, dedup=False, show_progress=False)
    distinct = list(dict.fromkeys(r["pos"][0] for r in recs))  # man pages repeat some descriptions
    q = emb.encode_queries([r["query"] for r in recs])
    p = emb.encode_corpus(distinct)
    full = q @ p.T
    own = np.array([distinct.index(r["pos"][0]) for r in recs])
    ranks = 1 + (full > full[np.arange(len(recs)), own][:, None]).sum(1)
    expected = {int(i) + 1 for i in np.flatnonzero(ranks > 2)}
    drops = {d["line"]: d for d in map(json.loads, open(dropped))}
    assert set(drops) == expected and s.dropped["rank"] == len(expected)
    assert len(expected & set(range(31, 37))) >= 4 and len(expected) < 15  # mismatched pairs mostly go
    for line, d in drops.items():
        assert int(d["detail"].split()[2]) == ranks[line - 1]  # "positive ranked R among ..."
    # sampled (fewer than the others): reported ranks are over the sample, never better than the exact rank
    s = filter_pairs(src, str(tmp_path / "c.jsonl"), scorer=EmbedderScorer(emb), top_k=1, rank_sample_size=10,
                     dropped_file=dropped, dedup=False, show_progress=False)
    for d in map(json.loads, open(dropped)):
        assert 1 < int(d["detail"].split()[2]) <= ranks[d["line"] - 1]


def test_errors(tmp_path, emb, pages, capsys):
    src = write(tmp_path / "pairs.jsonl", make_records(pages)[:5])
    with pytest.raises(ValueError, match="replace the input"):
        filter_pairs(src, src)
    with pytest.raises(ValueError, match="need a reference scorer"):
        filter_pairs(src, str(tmp_path / "o.jsonl"), min_score=0.4)
    with pytest.raises(ValueError, match="dedup_embedder"):
        filter_pairs(src, str(tmp_path / "o.jsonl"), near_duplicate_threshold=0.9)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n\n{"query": "", "pos": ["p"]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: query: empty"):
        filter_pairs(str(bad), str(tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()


def test_cli(tmp_path, minilm_dir, emb, pages, capsys):
    recs = make_records(pages)
    reasons, _ = expected_drops(recs, emb, 0.3, 0.95)
    src = write(tmp_path / "pairs.jsonl", recs)
    out = tmp_path / "kept.jsonl"
    code = main(["filter", "--input_file", src, "--output_file", str(out), "--model_name_or_path", minilm_dir,
                 "--passage_max_len", "96", "--query_max_len", "32", "--min_score", "0.3",
                 "--near_duplicate_threshold", "0.95", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    counts = ", ".join(f"{r} {list(reasons.values()).count(r)}" for r in ("duplicate", "low_score", "rank",
                                                                              "near_duplicate"))
    assert f"kept {len(recs) - len(reasons)}, dropped {len(reasons)} ({counts})" in text
    assert len(out.read_text().splitlines()) == len(recs) - len(reasons)
