"""Dynamic hard negatives during fine-tuning: each re-mine equals `trine mine` run on the weights of
that step (same range, number, margin and seed), never a positive, and a resumed run restores them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_finetune import PAGES, common_args, no_dropout_copy, weights, write_data

from trine import Embedder
from trine.curation.mining import mine_hard_negatives
from trine.errors import OptionError
from trine.partition import contiguous_bounds
from trine.training.dynamic_negatives import (
    STATE_KEY,
    DynamicNegativesCallback,
    decode_negatives,
    gather_pool_encodings,
)
from trine.training.finetune import build_trainer, parse_args

INSTRUCTION = "Find the manual page: "
OPTIONS = dict(dynamic_negatives_steps=2, dynamic_negatives_range="1-12", dynamic_negatives_number=3,
               dynamic_negatives_relative_margin=0.01, query_instruction_for_retrieval=INSTRUCTION)


def callback(trainer) -> DynamicNegativesCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, DynamicNegativesCallback))


def saved_negatives(checkpoint) -> tuple[dict, list[list[str]] | None]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"].get(STATE_KEY)
    return state, state and decode_negatives(state["negatives"], state["records"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, splade_tiny_dir):
    """6 steps, a checkpoint after each; re-mines at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("dynamic")
    data = write_data(tmp / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp / "full", save_steps=1, **OPTIONS)))
    original = [list(r.neg) for r in callback(trainer).records]
    trainer.train()
    trainer.save_model(str(tmp / "full"))
    return tmp, data, trainer, original


def test_each_remine_equals_trine_mine_on_that_steps_weights(full_run):
    tmp, data, trainer, original = full_run
    cb = callback(trainer)
    logged = {h["step"]: h for h in trainer.state.log_history if "dynamic_neg_margin" in h}
    assert sorted(logged) == [2, 4]  # none at the last step (6)
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]  # no loss log lost
    assert all(math.isfinite(h["dynamic_neg_margin"]) and h["dynamic_neg_seconds"] >= 0 for h in logged.values())
    assert logged[2]["dynamic_neg_changed"] > 0  # the file's static negatives were replaced
    for step in (2, 4):
        state, rows = saved_negatives(tmp / "full" / f"checkpoint-{step}")
        assert state["step"] == step and state["seed"] == 11 + step
        got = [[cb.pool[x] for x in r] for r in rows]
        emb = Embedder(str(tmp / "full" / f"checkpoint-{step}"), show_progress=False, query_max_length=16,
                       passage_max_length=32, query_instruction_for_retrieval=INSTRUCTION)
        out = tmp / f"mined-{step}.jsonl"
        summary = mine_hard_negatives(data, str(out), emb, range_for_sampling=(1, 12), negative_number=3,
                                      relative_margin=0.01, seed=11 + step, show_progress=False)
        mined = [json.loads(line) for line in open(out)]
        assert got == [m["neg"] for m in mined]
        pos = sum(summary.positive_scores) / len(summary.positive_scores)
        neg = sum(summary.negative_scores) / len(summary.negative_scores)
        assert logged[step]["dynamic_neg_margin"] == pytest.approx(pos - neg, abs=1e-5)
        for m in mined:
            assert len(m["neg"]) == 3 and not set(m["neg"]) & set(m["pos"]) and m["query"] not in m["neg"]
        # between re-mines the checkpoints carry the negatives in force
        later, later_rows = saved_negatives(tmp / "full" / f"checkpoint-{step + 1}")
        assert later["step"] == step and later_rows == rows
    assert saved_negatives(tmp / "full" / "checkpoint-1")[0] is None  # before the first re-mine: the file's own
    assert [list(r.neg) for r in cb.records] == got != original  # the dataset trains on the step-4 negatives
    assert all(r.neg_scores is None for r in cb.records)


def test_resume_restores_the_negatives_in_force(full_run, splade_tiny_dir):
    tmp, data, full, _ = full_run
    resumed = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp / "resumed", save_steps=1, **OPTIONS)))
    resumed.train(resume_from_checkpoint=str(tmp / "full" / "checkpoint-3"))
    resumed.save_model(str(tmp / "resumed"))
    a, b = callback(full), callback(resumed)
    assert b.history[0]["restored"] and b.history[0]["step"] == 2
    assert [h["hash"] for h in a.history] == [h["hash"] for h in b.history]  # step 2 restored, step 4 re-mined
    assert [r.neg for r in a.records] == [r.neg for r in b.records]
    wa, wb = weights(tmp / "full"), weights(tmp / "resumed")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    # another pool than the checkpoint's: refused, not silently mixed
    other = tmp / "other.jsonl"
    other.write_text("".join(open(data).readlines()[:12]))
    wrong = build_trainer(*parse_args(common_args(splade_tiny_dir, str(other), tmp / "wrong", **OPTIONS)))
    with pytest.raises(OptionError, match="another pool"):
        wrong.train(resume_from_checkpoint=str(tmp / "full" / "checkpoint-3"))


def test_bad_options_are_named(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")

    def build(**extra):
        return build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", **{**OPTIONS, **extra})))

    with pytest.raises(ValueError, match="dynamic_negatives_range"):
        parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", **{**OPTIONS, "dynamic_negatives_range": "9-3"}))
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", **{**OPTIONS, "dataloader_num_workers": 1}))
    with pytest.raises(OptionError, match="dynamic_negatives: relative_margin"):
        build(dynamic_negatives_relative_margin=1.5)
    with pytest.raises(OptionError, match="dynamic_negatives: hybrid ranking needs lexical weights"):
        build(dynamic_negatives_hybrid_weights=["1", "0.3"])
    with pytest.raises(OptionError, match="knowledge_distillation"):
        scored = tmp_path / "scored.jsonl"
        scored.write_text("".join(json.dumps({**json.loads(line), "pos_scores": [1.0], "neg_scores": [0.1, 0.2]}) + "\n"
                                  for line in open(data)))
        build_trainer(*parse_args(common_args(splade_tiny_dir, str(scored), tmp_path / "o", knowledge_distillation=True,
                                              **OPTIONS)))
    assert not os.path.exists(tmp_path / "o")


def test_per_epoch_remines_at_each_later_epoch_start(tmp_path, splade_tiny_dir):
    data = write_data(tmp_path / "train.jsonl")  # 16 records, batches of 4: 4 steps an epoch
    options = {**OPTIONS, "dynamic_negatives_steps": 0, "dynamic_negatives_epochs": 1}
    trainer = build_trainer(*parse_args(common_args(splade_tiny_dir, data, tmp_path / "o", max_steps=-1,
                                                    num_train_epochs=2, save_steps=100, logging_steps=4, **options)))
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "dynamic_neg_margin" in h] == [4]  # not at epoch 0
    assert trainer.state.stateful_callbacks[STATE_KEY]["step"] == 4


def test_torchrun_two_processes_mine_what_one_does(tmp_path, splade_tiny_dir):
    """Under DDP the re-mine (each rank encodes its shard of the pool, the shards are gathered, rank 0's
    negatives are broadcast) and the step's loss log keep the ranks in step: 2 ranks of 2 queries with
    cross-device negatives train like 1 rank of 4, on the same negatives."""
    model = no_dropout_copy(splade_tiny_dir, tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    options = {**OPTIONS, "max_steps": 3, "save_steps": 2}
    subprocess.run([sys.executable, "-m", "trine.training.finetune",
                    *common_args(model, data, tmp_path / "one", **options)], check=True, env=env, capture_output=True,
                   timeout=600)
    two = common_args(model, data, tmp_path / "two", per_device_train_batch_size=2, negatives_cross_device=True,
                      **options)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29300 + os.getpid() % 300), "-m", "trine.training.finetune", *two],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_state, one_rows = saved_negatives(tmp_path / "one" / "checkpoint-2")
    two_state, two_rows = saved_negatives(tmp_path / "two" / "checkpoint-2")
    assert one_state["hash"] == two_state["hash"] and one_rows == two_rows
    # the 2 ranks indexed the pool from their gathered shards: the scores of the mined negatives against the
    # positives' equal one process's (a missing or misplaced shard would score other vectors at these rows)
    margins = [[h["dynamic_neg_margin"] for h in json.loads((tmp_path / run / "checkpoint-2" / "trainer_state.json")
                                                             .read_text())["log_history"] if "dynamic_neg_margin" in h]
               for run in ("one", "two")]
    assert len(margins[0]) == len(margins[1]) == 1
    assert margins[1][0] == pytest.approx(margins[0][0], abs=1e-5)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def _gather_worker(rank, world_size, model_dir, pool, outputs, rendezvous, out_dir):
    """One gloo rank: gather the pool's encodings, recording which texts this rank encoded itself."""
    import pickle

    import torch.distributed as dist

    from trine import M3Embedder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        emb = M3Embedder(model_dir, show_progress=False, passage_max_length=32)
        encoded, original = [], emb.encode_result

        def spy(texts, *args, **kwargs):
            encoded.extend(texts)
            return original(texts, *args, **kwargs)

        emb.encode_result = spy
        got = gather_pool_encodings(emb, pool, outputs)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"encoded": encoded, "dense": got.dense_vecs, "lexical": got.lexical_weights}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size, size, outputs, shards", [
    (2, 7, ("dense", "sparse"), [(0, 4), (4, 7)]),  # uneven shards, hybrid ranking's lexical weights too
    (3, 2, ("dense",), [(0, 1), (1, 2), (2, 2)]),  # a pool smaller than the world: the last rank has no shard
])
def test_each_rank_encodes_its_shard_and_the_gather_equals_one_process(tmp_path, tiny_m3_dir, world_size, size,
                                                                          outputs, shards):
    import pickle

    import numpy as np
    import torch.multiprocessing as mp

    from trine import M3Embedder

    pool = [d for _, d in PAGES][:size]
    assert contiguous_bounds(size, world_size) == shards
    mp.spawn(_gather_worker, args=(world_size, tiny_m3_dir, pool, outputs, str(tmp_path / "rendezvous"),
                                   str(tmp_path)), nprocs=world_size)
    ranks = []
    for rank in range(world_size):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    # each rank encoded exactly its contiguous shard, nothing else
    assert [r["encoded"] for r in ranks] == [pool[lo:hi] for lo, hi in shards]
    # every rank holds the whole pool, in pool order, equal to one process encoding it all
    one = M3Embedder(tiny_m3_dir, show_progress=False, passage_max_length=32).encode_result(pool, outputs,
                                                                                          kind="passage")
    for r in ranks:
        assert r["dense"].shape == one.dense_vecs.shape
        assert np.array_equal(r["dense"], ranks[0]["dense"])
        np.testing.assert_allclose(r["dense"], one.dense_vecs, atol=1e-5, rtol=0)
        if "sparse" in outputs:
            assert [set(w) for w in r["lexical"]] == [set(w) for w in one.lexical_weights]
            for got, want in zip(r["lexical"], one.lexical_weights):
                assert [got[k] for k in want] == pytest.approx([want[k] for k in want], abs=1e-5)
        else:
            assert r["lexical"] is None


def test_mining_from_given_encodings_equals_mining_that_encodes(tmp_path, splade_tiny_dir):
    from trine.curation.common import read_records
    from trine.curation.mining import NegativeMiner

    records = read_records(write_data(tmp_path / "train.jsonl"))
    pool = list(dict.fromkeys(t for r in records for t in (*r.pos, *r.neg)))
    emb = Embedder(splade_tiny_dir, show_progress=False, query_max_length=16, passage_max_length=32)
    miner = NegativeMiner(emb, range_for_sampling=(1, 12), negative_number=3, seed=5, show_progress=False)
    summary, picks = miner.mine(records, pool)
    expected = list(picks)
    encoded = emb.encode_result(pool, ("dense",), kind="passage")
    halves = [type(encoded)(encoded.dense_vecs[:5]), type(encoded)(encoded.dense_vecs[5:])]
    given_summary, given = miner.mine(records, pool, encodings=halves)
    assert list(given) == expected and given_summary.cache == "given"
    assert list(given_summary.negative_scores) == pytest.approx(list(summary.negative_scores), abs=1e-6)
    for wrong in ([halves[0]], [*halves, halves[0]]):  # a shard missing, a shard too many
        with pytest.raises(ValueError, match="pool encodings given for a pool of"):
            miner.mine(records, pool, encodings=wrong)
