"""`trine mine` on real text: negatives come from the requested ranks, never a positive or the query."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import unavailable

from trine import Embedder
from trine.cli import main
from trine.curation.mining import mine_hard_negatives, parse_range
from trine.datasets.manpages import load_manpages
from trine.training.data import DataError, load_train_files


@pytest.fixture(scope="module")
def pages():
    try:
        return load_manpages(update_package_lists=True)[:150]
    except RuntimeError as err:
        unavailable(f"man pages unavailable: {err}")


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
        # ranks 2-30 by score, not by position: FAISS and numpy may order near-ties differently
        ordered = np.sort(scores)[::-1]
        hi, lo = float(ordered[2]) + 1e-5, float(ordered[29]) - 1e-5
        pos_score = float(scores[pool.index(r["pos"][0])])
        assert len(r["neg"]) <= 5 and len(set(r["neg"])) == len(r["neg"])
        for neg in r["neg"]:
            assert neg not in r["pos"] and neg != r["query"]
            assert lo <= float(scores[pool.index(neg)]) <= hi
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
    with pytest.raises(ValueError, match="replace the input"):
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


# ---------------------------------------------------------------------------------------- issue 6 additions
def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_hybrid_ranks_equal_brute_force(tmp_path, tiny_m3_dir, pages):
    from trine import M3Embedder
    from trine.scoring import lexical_scores

    src = write(tmp_path / "train.jsonl", pages[:60])
    out = str(tmp_path / "mined.jsonl")
    emb = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=96, query_max_length=32)
    w_d, w_s = 1.0, 0.3
    lo, hi = 3, 25
    pool = list(dict.fromkeys(p.description for p in pages[:60]))
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(lo, hi), negative_number=4, backfill="none",
                                  hybrid_weights=(w_d, w_s), hybrid_candidates=len(pool), query_chunk_size=16,
                                  search_batch_size=5)
    assert summary.ranking.startswith("hybrid")
    c = emb.encode_corpus(pool, return_sparse=True)
    q = emb.encode_queries([p.name for p in pages[:60]], return_sparse=True)
    fused = w_d * (q["dense_vecs"].astype(np.float64) @ c["dense_vecs"].T.astype(np.float64)) \
        + w_s * lexical_scores(q["lexical_weights"], c["lexical_weights"])
    mined_scores = []
    for r, s in zip(_rows(out), fused):
        desc = np.sort(s)[::-1]
        assert len(r["neg"]) == 4
        for neg in r["neg"]:
            assert neg not in r["pos"] and neg != r["query"]
            score = s[pool.index(neg)]
            mined_scores.append(score)
            # rank in [lo, hi) of the brute-force fused ranking (ties tolerated)
            assert desc[hi - 1] - 1e-4 <= score <= desc[lo] + 1e-4
    np.testing.assert_allclose(np.asarray(summary.negative_scores), mined_scores, rtol=1e-4, atol=1e-4)
    assert len(load_train_files([out], train_group_size=5)[0].records) == 60


def test_hybrid_normalization_ranks_equal_brute_force(tmp_path, splade_tiny_dir, pages):
    from trine import M3Embedder
    from trine.scoring import lexical_scores, normalize_scores

    src = write(tmp_path / "train.jsonl", pages[:40])
    out = str(tmp_path / "mined.jsonl")
    # a real (if small) model: its scores spread enough that min-max does not magnify float32 noise
    emb = M3Embedder(splade_tiny_dir, init_missing_heads="neutral", show_progress=False, passage_max_length=96,
                     query_max_length=32)
    pool = list(dict.fromkeys(p.description for p in pages[:40]))
    lo, hi = 2, 15
    with pytest.raises(ValueError, match="relative_margin"):
        mine_hard_negatives(src, out, emb, hybrid_weights=(1, 0.5), hybrid_normalization="minmax",
                            relative_margin=0.1)
    with pytest.raises(ValueError, match="unknown score normalization"):
        mine_hard_negatives(src, out, emb, hybrid_weights=(1, 0.5), hybrid_normalization="l1")
    assert not os.path.exists(out)
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(lo, hi), negative_number=3, backfill="none",
                                  hybrid_weights=(1, 0.5), hybrid_normalization="minmax",
                                  hybrid_candidates=len(pool))
    assert summary.ranking.endswith("(minmax)")
    # every candidate is in the union (the dense list holds the whole pool): min-max over the whole pool
    c = emb.encode_corpus(pool, return_sparse=True)
    q = emb.encode_queries([p.name for p in pages[:40]], return_sparse=True)
    dense = q["dense_vecs"].astype(np.float64) @ c["dense_vecs"].T.astype(np.float64)
    lexical = lexical_scores(q["lexical_weights"], c["lexical_weights"])
    fused = normalize_scores(dense, method="minmax") + 0.5 * normalize_scores(lexical, method="minmax")
    raw = dense + 0.5 * lexical
    moved = 0
    for r, s, s_raw in zip(_rows(out), fused, raw):
        desc = np.sort(s)[::-1]
        assert len(r["neg"]) == 3
        for neg in r["neg"]:
            assert desc[hi - 1] - 1e-4 <= s[pool.index(neg)] <= desc[lo] + 1e-4
        moved += list(np.argsort(-s)[lo:hi]) != list(np.argsort(-s_raw)[lo:hi])
    assert moved  # the normalised ranking is not the raw one


def test_hybrid_needs_m3_and_valid_options(tmp_path, minilm_dir, pages):
    src = write(tmp_path / "train.jsonl", pages[:10])
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=32)
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="M3Embedder"):
        mine_hard_negatives(src, out, emb, hybrid_weights=(1, 0.3))
    with pytest.raises(ValueError, match="unknown index options"):
        mine_hard_negatives(src, out, emb, index_options={"efsearch": 3})
    with pytest.raises(ValueError, match="index_kind"):
        mine_hard_negatives(src, out, emb, index_kind="lsh")
    assert not (tmp_path / "o.jsonl").exists()


def test_streaming_chunks_give_the_same_output_and_bounded_batches(tmp_path, minilm_dir, pages):
    src = write(tmp_path / "train.jsonl", pages[:50])
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=64)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    mine_hard_negatives(src, a, emb, range_for_sampling=(2, 20), negative_number=3)
    sizes = []
    original = emb.encode_result  # what every consumer calls, queries with kind="query"

    def spy(texts, *args, **kwargs):
        if kwargs.get("kind") == "query":
            sizes.append(len(texts))
        return original(texts, *args, **kwargs)

    emb.encode_result = spy
    mine_hard_negatives(src, b, emb, range_for_sampling=(2, 20), negative_number=3, query_chunk_size=7,
                        search_batch_size=3)
    assert max(sizes) == 7 and sum(sizes) == 50  # queries encoded chunk by chunk, each once
    assert open(a).read() == open(b).read()


def test_hnsw_index_mines_from_the_requested_ranks(tmp_path, minilm_dir, pages):
    src = write(tmp_path / "train.jsonl", pages[:80])
    out = str(tmp_path / "mined.jsonl")
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=64)
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(2, 30), negative_number=5, backfill="none",
                                  index_kind="hnsw", index_options={"ef_search": 256, "hnsw_m": 16})
    assert summary.index_kind == "hnsw"
    pool = list(dict.fromkeys(p.description for p in pages[:80]))
    corpus = emb.encode_corpus(pool)
    inside = total = 0
    for r, q in zip(_rows(out), emb.encode_queries([p.name for p in pages[:80]])):
        ranking = [pool[j] for j in np.argsort(-(corpus @ q), kind="stable")]
        for neg in r["neg"]:
            assert neg not in r["pos"]
            inside += neg in set(ranking[2:30])
            total += 1
    assert total > 0 and inside / total >= 0.95  # approximate search: nearly every pick from the exact range


def test_embedding_cache_is_reused_and_keyed(tmp_path, minilm_dir, pages):
    import torch

    src = write(tmp_path / "train.jsonl", pages[:40])
    cache = str(tmp_path / "cache")
    emb = Embedder(minilm_dir, show_progress=False, passage_max_length=64)
    outs = [str(tmp_path / f"m{i}.jsonl") for i in range(5)]
    first = mine_hard_negatives(src, outs[0], emb, range_for_sampling=(1, 15), negative_number=4, cache_dir=cache,
                                corpus_block_size=16)
    assert first.cache == "miss" and len(os.listdir(cache)) == 1
    calls = []
    original = emb.encode_result
    emb.encode_result = lambda texts, *a, **k: (k.get("kind") == "passage" and calls.append(len(texts))) \
        or original(texts, *a, **k)
    second = mine_hard_negatives(src, outs[1], emb, range_for_sampling=(1, 15), negative_number=4, cache_dir=cache,
                                 corpus_block_size=7)
    assert second.cache == "hit" and calls == []  # the pool was not encoded again
    assert open(outs[0]).read() == open(outs[1]).read()
    assert list(second.negative_scores) == list(first.negative_scores)
    # a different pool, other encoder settings, or changed weights never reuse the entry
    src2 = write(tmp_path / "train2.jsonl", pages[:39])
    assert mine_hard_negatives(src2, outs[2], emb, cache_dir=cache).cache == "miss"
    emb.passage_max_length = 48
    assert mine_hard_negatives(src, outs[3], emb, cache_dir=cache).cache == "miss"
    with torch.no_grad():
        emb.model.backbone.embeddings.word_embeddings.weight[1000] += 0.01
    assert mine_hard_negatives(src, outs[4], emb, cache_dir=cache).cache == "miss"
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 4


def test_cli_hybrid_with_cache(tmp_path, tiny_m3_dir, pages, capsys):
    src = write(tmp_path / "train.jsonl", pages[:30])
    out = tmp_path / "mined.jsonl"
    args = ["mine", "--input_file", src, "--output_file", str(out), "--model_name_or_path", tiny_m3_dir,
            "--hybrid_weights", "1,0.3", "--range_for_sampling", "1-12", "--negative_number", "3",
            "--passage_max_len", "64", "--cache_dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    assert "hybrid dense x 1.0 + sparse x 0.3" in capsys.readouterr().out
    first = out.read_text()
    assert main(args) == 0
    assert "embedding cache hit" in capsys.readouterr().out
    assert out.read_text() == first  # dense and lexical weights read back from the cache give the same output
    assert len(load_train_files([str(out)], train_group_size=4)[0].records) == 30
    assert main(["mine", "--input_file", src, "--output_file", src, "--model_name_or_path", tiny_m3_dir]) == 2
    assert "replace the input" in capsys.readouterr().err


def test_candidate_pool_bad_lines_are_named(tmp_path):
    from trine.curation.mining import read_pool
    from trine.training.data import DataError

    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b'{"text": "ok", "id": 1}\n\n{"txt": "x"}\n[1]\n{"text": 3}\n\xff\n')
    with pytest.raises(DataError) as err:
        read_pool(str(pool))
    assert err.value.problems == [f"{pool}:3: text: missing", f"{pool}:4: (line): a record must be a JSON object",
                                  f"{pool}:5: text: must be a string, got int",
                                  f"{pool}:6: (line): not UTF-8: byte 0xff at column 1"]  # as in training files
    pool.write_text('{"text": "a", "id": 1}\n{"text": "b"}\n')
    assert read_pool(str(pool)) == ["a", "b"]


# ---------------------------------------------------------------------------------------- ColBERT ranking
def _maxsim_matrix(queries, docs):
    from trine.scoring import colbert_score

    return np.array([[colbert_score(q, d) for d in docs] for q in queries])


def _assert_in_ranks(rows, scores, pool, lo, hi, tolerance=1e-4):
    for r, s in zip(rows, scores):
        desc = np.sort(s)[::-1]
        for neg in r["neg"]:
            assert neg not in r["pos"] and neg != r["query"]
            assert desc[hi - 1] - tolerance <= s[pool.index(neg)] <= desc[lo] + tolerance


def test_colbert_exact_ranks_equal_brute_force_maxsim(tmp_path, tiny_m3_dir, pages):
    from trine import M3Embedder

    src = write(tmp_path / "train.jsonl", pages[:40])
    out = str(tmp_path / "mined.jsonl")
    emb = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=64, query_max_length=24)
    lo, hi = 2, 20
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(lo, hi), negative_number=4, backfill="none",
                                  colbert_index="exact", relative_margin=0.01, search_batch_size=7)
    assert (summary.ranking, summary.index_kind) == ("colbert maxsim", "exact")
    pool = list(dict.fromkeys(p.description for p in pages[:40]))
    c = emb.encode_corpus(pool, return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    q = emb.encode_queries([p.name for p in pages[:40]], return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    maxsim = _maxsim_matrix(q, c)
    rows = _rows(out)
    _assert_in_ranks(rows, maxsim, pool, lo, hi, tolerance=2e-3)  # the index keeps float16 vectors
    for r, s in zip(rows, maxsim):
        positive = s[pool.index(r["pos"][0])]
        assert all(s[pool.index(n)] <= 0.99 * positive + 2e-3 for n in r["neg"])  # the margin: maxsim scores too
    assert summary.dropped_by_margin > 0
    mined = [s[pool.index(n)] for r, s in zip(rows, maxsim) for n in r["neg"]]
    np.testing.assert_allclose(np.asarray(summary.negative_scores), mined, atol=2e-3)


def test_colbert_plaid_ranks_by_its_decompressed_maxsim(tmp_path, tiny_m3_dir, pages):
    """With every passage a candidate, the plaid index ranks the pool by maxsim on its decompressed vectors."""
    from trine import M3Embedder
    from trine.retrieval.plaid import ColbertPlaidIndex

    src = write(tmp_path / "train.jsonl", pages[:40])
    out = str(tmp_path / "mined.jsonl")
    emb = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=64, query_max_length=24)
    pool = list(dict.fromkeys(p.description for p in pages[:40]))
    options = {"nbits": 4, "ncentroids": 16, "nprobe": 16, "ncandidates": len(pool), "seed": 3}
    lo, hi = 1, 15
    summary = mine_hard_negatives(src, out, emb, range_for_sampling=(lo, hi), negative_number=3, backfill="none",
                                  colbert_index="plaid", colbert_options=options)
    assert summary.index_kind == "plaid"
    c = emb.encode_corpus(pool, return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    q = emb.encode_queries([p.name for p in pages[:40]], return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    index = ColbertPlaidIndex.build(c, **options)  # deterministic by seed: the index the miner built
    decompressed = [index.doc_vectors(r) for r in range(len(pool))]
    rows = _rows(out)
    assert all(len(r["neg"]) == 3 for r in rows)
    _assert_in_ranks(rows, _maxsim_matrix(q, decompressed), pool, lo, hi)


def test_colbert_ranking_options_are_checked_before_encoding(tmp_path, minilm_dir, tiny_m3_dir, pages):
    from trine import M3Embedder

    src = write(tmp_path / "train.jsonl", pages[:10])
    out = str(tmp_path / "o.jsonl")
    m3 = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=32)
    for kwargs, message in (
            ({"colbert_index": "fast"}, "colbert_index must be one of"),
            ({"colbert_index": "exact", "hybrid_weights": (1, 0.3)}, "not with hybrid_weights"),
            ({"colbert_index": "exact", "index_kind": "hnsw"}, "do not apply"),
            ({"colbert_index": "exact", "backend": "qdrant"}, "do not apply"),
            ({"colbert_index": "plaid", "colbert_options": {"nbit": 2}}, "unknown plaid index options"),
            ({"colbert_index": "plaid", "colbert_options": {"nbits": 3}}, "nbits must be one of"),
            ({"colbert_index": "exact", "colbert_options": {"nbits": 2}}, "are the plaid index's")):
        with pytest.raises((ValueError, TypeError), match=message):
            mine_hard_negatives(src, out, m3, **kwargs)
    with pytest.raises(ValueError, match="M3Embedder"):
        mine_hard_negatives(src, out, Embedder(minilm_dir, show_progress=False), colbert_index="exact")
    assert not os.path.exists(out)


def test_cli_colbert_plaid_with_cache(tmp_path, tiny_m3_dir, pages, capsys):
    src = write(tmp_path / "train.jsonl", pages[:30])
    out = tmp_path / "mined.jsonl"
    args = ["mine", "--input_file", src, "--output_file", str(out), "--model_name_or_path", tiny_m3_dir,
            "--colbert_index", "plaid", "--nbits", "2", "--ncandidates", "20", "--nprobe", "4",
            "--range_for_sampling", "1-12", "--negative_number", "3", "--passage_max_len", "64",
            "--cache_dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    assert "ranking colbert maxsim, index plaid" in capsys.readouterr().out
    first = out.read_text()
    assert main(args) == 0
    assert "embedding cache hit" in capsys.readouterr().out
    assert out.read_text() == first  # multi-vectors read back from the cache give the same output
    assert len(load_train_files([str(out)], train_group_size=4)[0].records) == 30
    base = ["mine", "--input_file", src, "--output_file", str(tmp_path / "x.jsonl"), "--model_name_or_path",
            tiny_m3_dir]
    for extra, message in ((["--nbits", "2"], "options of --colbert_index plaid"),
                           (["--colbert_index", "exact", "--nprobe", "4"], "--nprobe goes with"),
                           (["--colbert_index", "exact", "--hybrid_weights", "1,0.3"], "not with --hybrid_weights")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
