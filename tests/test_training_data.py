"""Training data validation (file:line:field errors) and the seeded per-rank batch plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trine.training.data import DataError, load_train_files
from trine.training.dataset import EpochPlanDataset


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def good(i, n_neg=3):
    return {"query": f"query {i}", "pos": [f"positive {i}"], "neg": [f"negative {i}.{k}" for k in range(n_neg)]}


@pytest.mark.parametrize(
    "row,expected",
    [
        ("{not json", "2: (line): not valid JSON"),
        ('["a list"]', "2: (line): a record must be a JSON object"),
        ({"pos": ["p"], "neg": ["n"]}, "2: query: missing"),
        ({"query": "", "pos": ["p"], "neg": ["n"]}, "2: query: empty"),
        ({"query": 3, "pos": ["p"], "neg": ["n"]}, "2: query: must be a string"),
        ({"query": "q", "neg": ["n"]}, "2: pos: missing"),
        ({"query": "q", "pos": [], "neg": ["n"]}, "2: pos: empty"),
        ({"query": "q", "pos": "p", "neg": ["n"]}, "2: pos: must be a list of strings"),
        ({"query": "q", "pos": ["p"], "neg": [1, 2]}, "2: neg: must be a list of strings"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0]}, "2: pos_scores: 2 scores for 1 pos"),
        ({"query": "q", "pos": ["p"], "neg": ["n", "m"], "neg_scores": [1.0]}, "2: neg_scores: 1 scores for 2 neg"),
        (
            {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": ["high"]},
            "2: pos_scores: must be a list of numbers",
        ),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "type": "symmetric_sts"}, "2: type:"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "negs": ["n"]}, "2: negs: unknown field"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "prompt": 5}, "2: prompt: must be a string"),
    ],
)
def test_each_malformed_record_is_reported_with_file_line_field(tmp_path, row, expected):
    path = write(tmp_path / "train.jsonl", [good(0, 1), row, good(2, 1)])
    with pytest.raises(DataError) as info:
        load_train_files([path], train_group_size=2)
    assert f"{path}:{expected}" in str(info.value)


def test_all_problems_of_all_files_in_one_error(tmp_path):
    a = write(tmp_path / "a.jsonl", [good(0), {"query": "q"}, good(2)])
    b = write(tmp_path / "b.jsonl", ["{", good(1, n_neg=1)])
    with pytest.raises(DataError) as info:
        load_train_files([a, b], train_group_size=4)
    problems = info.value.problems
    assert f"{a}:2: pos: missing" in problems
    assert any(p.startswith(f"{b}:1: (line): not valid JSON") for p in problems)
    assert any(p.startswith(f"{b}:2: neg: 1 negatives, train_group_size 4 needs 3") for p in problems)


def test_missing_paths_and_teacher_scores(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_train_files([str(tmp_path / "nope.jsonl")], train_group_size=1)
    path = write(tmp_path / "t.jsonl", [good(0)])
    with pytest.raises(DataError, match="pos_scores: missing"):
        load_train_files([path], train_group_size=2, knowledge_distillation=True)


def test_pairs_without_negatives_are_fine_for_group_size_one(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [{"query": f"q{i}", "pos": [f"p{i}"]} for i in range(8)])
    (f,) = load_train_files([path], train_group_size=1)
    assert len(f.records) == 8 and f.records[0].neg == []
    with pytest.raises(DataError, match="needs 1"):
        load_train_files([path], train_group_size=2)


def test_fill_missing_negatives_from_other_records(tmp_path):
    path = write(tmp_path / "short.jsonl", [good(i, n_neg=1) for i in range(8)])
    files = load_train_files([path], train_group_size=4, fill_missing_negatives="random")
    ds = EpochPlanDataset(files, train_group_size=4, default_batch_size=4)
    for step in range(len(ds)):
        for ex in ds[step]["examples"]:
            i = ex.query.split()[-1]
            assert ex.passages[0] == f"positive {i}" and len(ex.passages) == 4
            assert len(set(ex.passages)) == 4
            assert f"negative {i}.0" in ex.passages[1:]


def test_plan_same_file_per_global_batch_rank_slices_and_resampling(tmp_path):
    a = write(tmp_path / "a.jsonl", [good(i, n_neg=6) for i in range(40)])
    b = write(tmp_path / "b.jsonl", [good(100 + i, n_neg=6) for i in range(24)])
    files = load_train_files([a, b], train_group_size=3, file_options={b: {"batch_size": 3}})
    ranks = [
        EpochPlanDataset(
            files,
            train_group_size=3,
            default_batch_size=4,
            world_size=2,
            rank=r,
            seed=7,
            same_dataset_within_batch=True,
        )
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 40 // 8 + 24 // 6
    seen = []
    for step in range(len(ranks[0])):
        qs = [[ex.query for ex in ds[step]["examples"]] for ds in ranks]
        ids = [[int(q.split()[-1]) for q in r] for r in qs]
        same_file = {i >= 100 for r in ids for i in r}
        assert len(same_file) == 1  # every rank is on the same file at this step
        assert len(ids[0]) == (3 if same_file == {True} else 4)
        assert not set(ids[0]) & set(ids[1])
        seen += ids[0] + ids[1]
    assert len(seen) == len(set(seen))
    first = {ex.query: ex.passages for ex in ranks[0][0]["examples"]}
    for ds in ranks:
        ds.set_epoch(1)
    again = [ex for step in range(len(ranks[0])) for ex in ranks[0][step]["examples"]]
    changed = [ex.passages[1:] != first[ex.query][1:] for ex in again if ex.query in first]
    assert changed and any(changed)  # negatives are resampled each epoch
    ds0 = EpochPlanDataset(
        files, train_group_size=3, default_batch_size=4, world_size=2, rank=0, seed=7, same_dataset_within_batch=True
    )
    assert [ex.passages for ex in ds0[0]["examples"]] == [first[q] for q in first]  # deterministic


def test_per_file_options_need_same_dataset(tmp_path):
    a = write(tmp_path / "a.jsonl", [good(i) for i in range(8)])
    files = load_train_files([a], train_group_size=2, file_options={a: {"batch_size": 2}})
    with pytest.raises(ValueError, match="same_dataset_within_batch"):
        EpochPlanDataset(files, train_group_size=2, default_batch_size=4)
    with pytest.raises(DataError, match="unknown"):
        load_train_files([a], train_group_size=2, file_options={a: {"batchsize": 2}})
    plain = load_train_files([a], train_group_size=2)
    with pytest.raises(ValueError, match="no complete global batch"):
        EpochPlanDataset(plain, train_group_size=2, default_batch_size=16, same_dataset_within_batch=True)


def test_group_by_length_sorts_within_windows(tmp_path):
    rows = [{"query": "q" * (i % 17 + 1) + f" {i}", "pos": ["p" * (i * 7 % 23 + 1)]} for i in range(64)]
    files = load_train_files([write(tmp_path / "l.jsonl", rows)], train_group_size=1)
    ds = EpochPlanDataset(files, train_group_size=1, default_batch_size=8, group_by_length=True)
    spans = []
    for step in range(len(ds)):
        lengths = [len(ex.query) + len(ex.passages[0]) for ex in ds[step]["examples"]]
        spans.append(max(lengths) - min(lengths))
    plain = EpochPlanDataset(files, train_group_size=1, default_batch_size=8)
    plain_spans = []
    for step in range(len(plain)):
        lengths = [len(ex.query) + len(ex.passages[0]) for ex in plain[step]["examples"]]
        plain_spans.append(max(lengths) - min(lengths))
    assert np.mean(spans) < np.mean(plain_spans)
