"""FlagEmbedding's data options (record types, max_example_num_per_dataset, shuffle_ratio,
small_threshold / drop_threshold, the no_in_batch_neg file-name convention) against FlagEmbedding
1.4.2's own dataset classes on the same files, and the hn_mine.py / add_reranker_score.py option
names of `trine mine` / `trine score`.

FlagEmbedding's datasets are built on the CPU with no tokenizer (their batch building never
tokenizes). Sampling draws from another generator (Python's ``random`` there, seeded numpy here),
so batches are compared by what the options decide: which records, the batch and group sizes per
type, the instruction each text carries, the multiset of positives; ``max_example_num_per_dataset``
keeps exactly FlagEmbedding's rows for the same seed."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from trine.data import DataError, apply_dataset_options, load_train_files
from trine.errors import OptionError
from trine.training.collator import EmbedderCollator
from trine.training.dataset import EpochPlanDataset, shuffle_text

flag_dataset = pytest.importorskip("FlagEmbedding.abc.finetune.embedder.AbsDataset")
flag_args = pytest.importorskip("FlagEmbedding.abc.finetune.embedder.AbsArguments")

TYPES = ("normal", "only_1neg", "symmetric_class", "symmetric_sts", "symmetric_clustering")


@pytest.fixture(autouse=True)
def _offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def rows_of(kind, n, negs=3, **extra):
    return [{"query": f"{kind} q{i}", "pos": [f"{kind} p{i}"], "neg": [f"{kind} n{i}.{k}" for k in range(negs)],
             **({"type": kind} if kind != "normal" else {}), **extra} for i in range(n)]


def flag_data_args(tmp_path, train_data, **kw):
    return flag_args.AbsEmbedderDataArguments(train_data=train_data, cache_path=str(tmp_path / "hf_cache"), **kw)


def flag_batches(ds):
    """Every batch of a FlagEmbedding same-dataset epoch: (queries, passages, in_batch_negatives)."""
    out = []
    for _ in range(len(ds.batch_datas)):
        queries, passages, _, no_in_batch = ds[0]
        out.append((queries, passages, not no_in_batch))
    return out


def trine_batches(ds, collator):
    out = []
    for step in range(len(ds)):
        item = ds[step]
        queries, passages, _ = collator.texts([item])
        out.append((queries, passages, item["in_batch_negatives"]))
    return out


def summary(batches):
    """Per type (read from the query): batch sizes, group sizes, the queries, the positives, which
    instruction the passages carry, and the in-batch flag."""
    out = {}
    for queries, passages, in_batch in batches:
        kind = queries[0].split(": ", 1)[1].split()[0]
        group = len(passages) // len(queries)
        s = out.setdefault(kind, {"batch": set(), "group": set(), "queries": Counter(), "pos": Counter(),
                                  "neg_prefix": set(), "in_batch": set()})
        s["batch"].add(len(queries))
        s["group"].add(group)
        s["queries"].update(queries)
        s["pos"].update(passages[::group])
        s["neg_prefix"].update(p.split(": ")[0] for i, p in enumerate(passages) if i % group)
        s["in_batch"].add(in_batch)
    return out


def test_record_types_match_flagembedding_same_dataset_batches(tmp_path):
    sizes = {"normal": 8, "only_1neg": 8, "symmetric_class": 4, "symmetric_sts": 4, "symmetric_clustering": 4}
    paths = [write(tmp_path / f"{k}.jsonl", rows_of(k, n, negs=2 if k == "symmetric_class" else 3))
             for k, n in sizes.items()]
    options = dict(train_group_size=4, query_instruction_for_retrieval="Q: ", passage_instruction_for_retrieval="P: ")
    flag = flag_dataset.AbsEmbedderSameDatasetTrainDataset(
        flag_data_args(tmp_path, paths, same_dataset_within_batch=True, **options),
        default_batch_size=4, seed=3, tokenizer=None)
    files = load_train_files(paths, train_group_size=4)
    ds = EpochPlanDataset(files, train_group_size=4, default_batch_size=4, seed=3, same_dataset_within_batch=True)
    collator = EmbedderCollator(None, query_max_len=32, passage_max_len=32, query_instruction_for_retrieval="Q: ",
                                passage_instruction_for_retrieval="P: ")
    ours, theirs = summary(trine_batches(ds, collator)), summary(flag_batches(flag))
    assert ours == theirs
    # what FlagEmbedding decides, spelled out: group sizes, half batches for symmetric files, and
    # symmetric_sts / symmetric_clustering passages carrying the query's instruction
    assert {k: (s["batch"], s["group"], s["neg_prefix"]) for k, s in ours.items()} == {
        "normal": ({4}, {4}, {"P"}), "only_1neg": ({4}, {2}, {"P"}), "symmetric_class": ({2}, {3}, {"P"}),
        "symmetric_sts": ({2}, {4}, {"Q"}), "symmetric_clustering": ({2}, {4}, {"Q"})}
    assert len(ds) == len(flag.batch_datas)


def test_unknown_and_mixed_types_are_errors_naming_file_line_field(tmp_path):
    path = write(tmp_path / "t.jsonl", rows_of("normal", 2) + [{"query": "q", "pos": ["p"], "neg": ["n"] * 3,
                                                                "type": "symmetric_foo"}])
    with pytest.raises(DataError) as info:
        load_train_files([path], train_group_size=2)
    assert info.value.problems == [f"{path}:3: type: 'symmetric_foo' is not supported (supported: "
                                   "normal, only_1neg, symmetric_class, symmetric_clustering, symmetric_sts)"]
    mixed = write(tmp_path / "m.jsonl", rows_of("normal", 2) + rows_of("only_1neg", 1))
    with pytest.raises(DataError, match=rf"{mixed}:3: type: 'only_1neg' differs from 'normal' \(line 1\)"):
        load_train_files([mixed], train_group_size=2)
    typed = load_train_files([write(tmp_path / "s.jsonl", rows_of("symmetric_sts", 4))], train_group_size=2)
    with pytest.raises(ValueError, match="'symmetric_sts' records need same_dataset_within_batch"):
        EpochPlanDataset(typed, train_group_size=2, default_batch_size=2)


def test_type_sets_the_negatives_a_record_needs(tmp_path):
    one = write(tmp_path / "one.jsonl", rows_of("only_1neg", 4, negs=1))
    (f,) = load_train_files([one], train_group_size=8)  # only_1neg needs one negative, whatever the group size
    assert f.kind == "only_1neg"
    none = write(tmp_path / "none.jsonl", rows_of("only_1neg", 4, negs=0))
    with pytest.raises(DataError, match=r"none.jsonl:1: neg: 0 negatives, type 'only_1neg' groups of 2 needs 1"):
        load_train_files([none], train_group_size=8)
    cls = write(tmp_path / "cls.jsonl", rows_of("symmetric_class", 4, negs=1, category="label"))
    (f,) = load_train_files([cls], train_group_size=8)  # as many negatives as it has
    assert f.records[0].category == "label"


def test_max_example_num_per_dataset_keeps_flagembeddings_rows(tmp_path):
    path = write(tmp_path / "big.jsonl", rows_of("normal", 30))
    for seed in (0, 7):
        random.seed(seed)  # FlagEmbedding's runner: transformers.set_seed(seed) before the dataset
        flag = flag_dataset.AbsEmbedderTrainDataset(
            flag_data_args(tmp_path, [path], max_example_num_per_dataset=11), tokenizer=None)
        files = apply_dataset_options(load_train_files([path], train_group_size=4),
                                      max_example_num_per_dataset=11, seed=seed)
        assert [r.query for r in files[0].records] == list(flag.dataset["query"])
    small = apply_dataset_options(load_train_files([path], train_group_size=4), max_example_num_per_dataset=30)
    assert len(small[0].records) == 30


def test_shuffle_ratio_is_flagembeddings_augmentation_of_positives():
    text = "".join(chr(97 + i % 26) for i in range(150))
    flag = SimpleNamespace(shuffle_ratio=1.0)
    theirs = set()
    for seed in range(200):
        random.seed(seed)
        theirs.add(flag_dataset.AbsEmbedderTrainDataset._shuffle_text(flag, text))
    ours = {shuffle_text(text, 1.0, np.random.default_rng(seed)) for seed in range(200)}
    assert ours == theirs and len(ours) == 6  # three chunks of len // 3 + 1, every order, joined by spaces
    short = text[:100]  # FlagEmbedding shuffles only texts longer than 100 characters
    assert shuffle_text(short, 1.0, np.random.default_rng(0)) == short
    assert flag_dataset.AbsEmbedderTrainDataset._shuffle_text(flag, short) == short
    rate = np.mean([shuffle_text(text, 0.3, np.random.default_rng(s)) != text for s in range(2000)])
    flag.shuffle_ratio = 0.3
    random.seed(0)
    flag_rate = np.mean([flag_dataset.AbsEmbedderTrainDataset._shuffle_text(flag, text) != text for _ in range(2000)])
    assert abs(rate - flag_rate) < 0.05 and 0.25 < rate < 0.35  # spaces join the chunks: every shuffle changes it


def test_shuffle_ratio_in_the_plan_touches_positives_only(tmp_path):
    rows = [{"query": f"q{i}", "pos": [f"{i} " + "positive text " * 10], "neg": [f"{i} " + "negative text " * 10]}
            for i in range(8)]
    files = load_train_files([write(tmp_path / "long.jsonl", rows)], train_group_size=2)
    ds = EpochPlanDataset(files, train_group_size=2, default_batch_size=4, shuffle_ratio=1.0)
    plain = EpochPlanDataset(files, train_group_size=2, default_batch_size=4)
    shuffled = [ex for s in range(len(ds)) for ex in ds[s]["examples"]]
    originals = {ex.query: ex for s in range(len(plain)) for ex in plain[s]["examples"]}
    assert sum(ex.passages[0] != originals[ex.query].passages[0] for ex in shuffled) >= 6
    for ex in shuffled:
        assert sorted(ex.passages[0].replace(" ", "")) == sorted(originals[ex.query].passages[0].replace(" ", ""))
        assert ex.passages[1:] == originals[ex.query].passages[1:]


@pytest.mark.parametrize("small_threshold,drop_threshold", [(6, 0), (6, 9), (4, 0), (0, 0)])
def test_small_and_drop_thresholds_merge_like_flagembedding(tmp_path, small_threshold, drop_threshold):
    folder = tmp_path / "mix_no_in_batch_neg"
    write(folder / "big.jsonl", rows_of("normal", 12))
    write(folder / "small1.jsonl", [dict(r, batch_size=2) for r in rows_of("normal", 3)])
    write(folder / "small2.jsonl", rows_of("normal", 5))
    alone = write(tmp_path / "alone.jsonl", rows_of("normal", 5))  # a file named on its own
    train_data = [str(folder), alone]
    flag = flag_dataset.AbsEmbedderSameDatasetTrainDataset(
        flag_data_args(tmp_path, train_data, same_dataset_within_batch=True, small_threshold=small_threshold,
                       drop_threshold=drop_threshold, query_instruction_for_retrieval=""),
        default_batch_size=4, seed=0, tokenizer=None)
    theirs = sorted((len(idx), bs, not flag_no) for idx, bs, flag_no in
                    zip(flag.each_data_idxs, flag.batch_size_idxs, flag.no_in_batch_neg_flags))
    files = apply_dataset_options(load_train_files(train_data, train_group_size=4), small_threshold=small_threshold,
                                  drop_threshold=drop_threshold)
    ours = sorted((len(f.records), f.resolved_batch_size(4), f.in_batch_negatives) for f in files)
    assert ours == theirs


def test_thresholds_need_same_dataset_and_leave_something(tmp_path):
    from trine.training.arguments import TrainDataArguments

    path = write(tmp_path / "a.jsonl", rows_of("normal", 4))
    with pytest.raises(ValueError, match="same_dataset_within_batch"):
        TrainDataArguments(train_data=[path], small_threshold=5)
    with pytest.raises(ValueError, match="shuffle_ratio"):
        TrainDataArguments(train_data=[path], shuffle_ratio=1.5)
    with pytest.raises(DataError, match="no training data left"):
        apply_dataset_options(load_train_files([path], train_group_size=4), small_threshold=5)
    folder = tmp_path / "f"
    write(folder / "x.jsonl", rows_of("normal", 2))
    write(folder / "y.jsonl", rows_of("only_1neg", 2))
    with pytest.raises(DataError, match="small files merged by small_threshold disagree"):
        apply_dataset_options(load_train_files([str(folder)], train_group_size=2), small_threshold=5)


def test_no_in_batch_neg_file_names_and_file_options(tmp_path):
    a = write(tmp_path / "a_no_in_batch_neg.jsonl", rows_of("normal", 4))
    b = write(tmp_path / "b.jsonl", rows_of("normal", 4))
    fa, fb = load_train_files([a, b], train_group_size=2)
    assert (fa.in_batch_negatives, fb.in_batch_negatives) == (False, True)
    (fa,) = load_train_files([a], train_group_size=2, file_options={a: {"in_batch_negatives": True}})
    assert fa.in_batch_negatives


def parse(*argv):
    from trine.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_mine_takes_hn_mine_option_names():
    args = parse("mine", "--embedder_name_or_path", "m", "--input_file", "a", "--output_file", "b",
                 "--embedder_query_max_length", "7", "--embedder_passage_max_length", "9", "--devices", "cpu", "cpu",
                 "--use_fp16", "False", "--use_gpu_for_searching", "False", "--embedder_model_class", "encoder-only-m3",
                 "--normalize_embeddings", "True", "--query_instruction_format_for_retrieval", "{}: {}",
                 "--range_for_sampling", "10-210", "--negative_number", "15", "--search_batch_size", "64")
    assert (args.model_name_or_path, args.query_max_len, args.passage_max_len, args.devices, args.use_fp16,
            args.model_type, args.query_instruction_format, args.range_for_sampling, args.search_batch_size) == (
        "m", 7, 9, ["cpu", "cpu"], False, "m3", "{}: {}", "10-210", 64)
    args = parse("mine", "--model_name_or_path", "m", "--input_file", "a", "--output_file", "b", "--use_fp16",
                 "--devices", "cpu")
    assert (args.use_fp16, args.devices) == (True, "cpu")
    base = ["mine", "--model_name_or_path", "m", "--input_file", "a", "--output_file", "b"]
    for bad, said in [(["--use_gpu_for_searching"], "FAISS on the CPU"), (["--pooling_method", "cls"], "pooling"),
                      (["--embedder_model_class", "decoder-only-icl"], "encoder-only-base, encoder-only-m3"),
                      (["--normalize_embeddings", "False"], "normalise"), (["--examples_for_task", "x"], "ICL")]:
        with pytest.raises(OptionError, match=said):
            parse(*base, *bad)


def test_score_takes_add_reranker_score_option_names():
    args = parse("score", "--reranker_name_or_path", "r", "--input_file", "a", "--output_file", "b",
                 "--reranker_max_length", "100", "--reranker_batch_size", "8", "--reranker_model_class",
                 "encoder-only-base", "--normalize", "--use_fp16", "True", "--compress_ratio", "1")
    assert (args.reranker, args.reranker_max_len, args.batch_size, args.normalize, args.use_fp16) == (
        "r", 100, 8, True, True)
    base = ["score", "--reranker", "r", "--input_file", "a", "--output_file", "b"]
    # FlagEmbedding's LLM reranker options (tests/test_layerwise_reranker.py runs them)
    args = parse(*base, "--prompt", "Is B about A?", "--cutoff_layers", "3", "--reranker_model_class",
                 "decoder-only-layerwise")
    assert (args.prompt, args.cutoff_layers, args.reranker_family) == ("Is B about A?", [3], "llm-reranker-layerwise")
    assert parse(*base, "--reranker_model_class", "decoder-only-base").reranker_family == "llm-reranker"
    assert parse(*base).reranker_family is None  # the folder says its family
    for bad in (["--use_bf16"], ["--reranker_peft_path", "p"], ["--reranker_model_class", "decoder-only-lightweight"],
                ["--query_instruction_for_rerank", "x"], ["--reranker_query_max_length", "30"]):
        with pytest.raises(OptionError, match=bad[0]):
            parse(*base, *bad)
