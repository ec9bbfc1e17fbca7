"""Training diagnostics: the numbers equal hand computations on fixed embeddings; the trainer writes them
every N steps (plain and gradient-cached steps); the collapse and divergence warnings fire."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from test_finetune import PAGES, common_args, write_data

from trine.training.diagnostics import TrainingDiagnostics, diagnose
from trine.training.finetune import build_trainer, parse_args
from trine.training.trainer import prepare_output_dir


def _reference_scores(scores, group, in_batch=True):
    """Plain-Python reference: accuracy, margins, share of hard negatives above the positive, suspects."""
    n_q = len(scores)
    correct, margins, above, hard_total, suspects, in_batch_margins = 0, [], 0, 0, [], []
    for i in range(n_q):
        pos = scores[i][i * group]
        columns = range(len(scores[i])) if in_batch else range(i * group, (i + 1) * group)
        others = [scores[i][j] for j in columns if j != i * group]
        correct += all(pos > o for o in others)
        in_batch_margins.append(pos - max(others))
        hard = [scores[i][i * group + k] for k in range(1, group)]
        margins.append(pos - max(hard))
        for k, h in enumerate(hard):
            hard_total += 1
            if h > pos:
                above += 1
                suspects.append((i, i * group + 1 + k))
    return {"accuracy": correct / n_q, "margin_mean": sum(margins) / n_q, "margins": margins,
            "negatives_above_positive": above / hard_total, "suspects": suspects,
            "margin_in_batch_mean": sum(in_batch_margins) / n_q}


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _reference_embeddings(q, p, group):
    qn, pn = [_unit(v) for v in q], [_unit(v) for v in p]
    alignment = sum(sum((a - b) ** 2 for a, b in zip(qn[i], pn[i * group])) for i in range(len(qn))) / len(qn)
    potentials, cosines = [], []
    for i in range(len(pn)):
        for j in range(i + 1, len(pn)):
            d2 = sum((a - b) ** 2 for a, b in zip(pn[i], pn[j]))
            potentials.append(math.exp(-2 * d2))
            cosines.append(sum(a * b for a, b in zip(pn[i], pn[j])))
    norms = [math.sqrt(sum(x * x for x in v)) for v in list(q) + list(p)]
    mean = sum(norms) / len(norms)
    return {"alignment": alignment, "uniformity": math.log(sum(potentials) / len(potentials)),
            "mean_cosine": sum(cosines) / len(cosines), "norm_mean": mean,
            "norm_std": math.sqrt(sum((n - mean) ** 2 for n in norms) / len(norms))}


def _reference_lexical(weights, ids):
    """Per text: the max weight of each token id; non-zeros per text; FLOPS = sum over ids of (mean weight)^2."""
    per_text = []
    for w_row, id_row in zip(weights, ids):
        d = {}
        for w, t in zip(w_row, id_row):
            d[t] = max(d.get(t, 0.0), w)
        per_text.append(d)
    nonzeros = [sum(1 for w in d.values() if w > 0) for d in per_text]
    vocab = {t for d in per_text for t in d}
    flops = sum((sum(d.get(t, 0.0) for d in per_text) / len(per_text)) ** 2 for t in vocab)
    return {"nonzeros_mean": sum(nonzeros) / len(nonzeros), "nonzeros_min": min(nonzeros), "flops": flops}


def _fixed_batch(n_q=4, group=3, dim=6, seed=5):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n_q, dim))
    p = rng.normal(size=(n_q * group, dim)) * rng.uniform(0.5, 2.0, size=(n_q * group, 1))
    p[::group] += 0.8 * q  # positives lean towards their query, not always enough
    return q, p


@pytest.mark.parametrize("in_batch", [True, False])
def test_dense_diagnostics_equal_hand_computation(in_batch):
    group = 3
    q, p = _fixed_batch(group=group)
    record, warnings = diagnose({"dense_vecs": torch.tensor(q)}, {"dense_vecs": torch.tensor(p)}, ["dense"],
                                loss=1.25, parts={"ce": 1.25}, in_batch_negatives=in_batch)
    assert warnings == []
    got = record["heads"]["dense"]
    scores = [[sum(a * b for a, b in zip(qi, pj)) for pj in p] for qi in q]
    ref = _reference_scores(scores, group, in_batch)
    assert 0 < ref["negatives_above_positive"] < 1 and 0 < ref["accuracy"] < 1  # the batch exercises both sides
    for key in ("accuracy", "margin_mean", "negatives_above_positive", "margin_in_batch_mean"):
        assert got[key] == pytest.approx(ref[key], abs=1e-5), key
    assert got["margins"] == pytest.approx(ref["margins"], abs=1e-5)
    assert [(s[0], s[1]) for s in got["suspects"]] == ref["suspects"]
    assert got["candidates"] == (len(p) if in_batch else group)
    for key, value in _reference_embeddings(q, p, group).items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    assert record["loss"] == 1.25 and record["loss_parts"] == {"ce": 1.25}


def test_lexical_and_colbert_diagnostics_equal_hand_computation():
    group = 2
    ids = {"q": [[5, 7, 7, 0], [9, 5, 0, 0]], "p": [[5, 8, 8, 1], [7, 2, 0, 0], [9, 9, 3, 0], [1, 4, 5, 6]]}
    weights = {"q": [[0.5, 0.2, 0.9, 0.0], [1.5, 0.0, 0.0, 0.0]],
               "p": [[0.3, 0.1, 0.6, 0.0], [0.4, 0.7, 0.0, 0.0], [2.0, 0.5, 0.8, 0.0], [0.0, 0.0, 1.1, 0.2]]}
    rng = np.random.default_rng(0)
    cv = {"q": rng.normal(size=(2, 3, 4)), "p": rng.normal(size=(4, 3, 4))}
    masks = {"q": [[1, 1, 0], [1, 1, 1]], "p": [[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]}
    reps = {side: {"token_weights": torch.tensor(weights[side]), "input_ids": torch.tensor(ids[side]),
                   "colbert_vecs": torch.tensor(cv[side]), "colbert_mask": torch.tensor(masks[side], dtype=torch.bool)}
            for side in ("q", "p")}
    record, _ = diagnose(reps["q"], reps["p"], ["sparse", "colbert"], loss=0.5, vocab_size=10)

    lexical = {side: [{} for _ in ids[side]] for side in ids}
    for side in ids:
        for row, (w_row, id_row) in enumerate(zip(weights[side], ids[side])):
            for w, t in zip(w_row, id_row):
                lexical[side][row][t] = max(lexical[side][row].get(t, 0.0), w)
    sparse_scores = [[sum(w * pd.get(t, 0.0) for t, w in qd.items()) for pd in lexical["p"]] for qd in lexical["q"]]
    colbert_scores = []
    for qi in range(2):
        row = []
        for pj in range(4):
            total = 0.0
            for a in range(3):
                if masks["q"][qi][a]:
                    total += max(float(np.dot(cv["q"][qi][a], cv["p"][pj][b])) for b in range(3) if masks["p"][pj][b])
            row.append(total / sum(masks["q"][qi]))  # maxsim averaged over the query's tokens
        colbert_scores.append(row)
    for head, scores in (("sparse", sparse_scores), ("colbert", colbert_scores)):
        ref = _reference_scores(scores, group)
        got = record["heads"][head]
        for key in ("accuracy", "margin_mean", "negatives_above_positive"):
            assert got[key] == pytest.approx(ref[key], abs=1e-6), (head, key)
    for side, name in (("q", "query"), ("p", "passage")):
        ref = _reference_lexical(weights[side], ids[side])
        for key, value in ref.items():
            assert record["heads"]["sparse"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_collapse_and_divergence_warnings():
    q = torch.ones(3, 4)
    p = torch.ones(6, 4) * 2
    record, warnings = diagnose({"dense_vecs": q}, {"dense_vecs": p}, ["dense"], loss=0.7)
    assert record["heads"]["dense"]["mean_cosine"] == pytest.approx(1.0)
    assert record["heads"]["dense"]["uniformity"] == pytest.approx(0.0, abs=1e-12)
    assert record["heads"]["dense"]["accuracy"] == 0.0  # ties: no positive is strictly above
    assert len(warnings) == 1 and "collapsing" in warnings[0]
    _, warnings = diagnose({"dense_vecs": torch.eye(3)}, {"dense_vecs": torch.eye(6)[:, :3].contiguous()},
                           ["dense"], loss=float("nan"))
    assert any("diverged" in w for w in warnings)
    reps = {"token_weights": torch.zeros(2, 3), "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    _, warnings = diagnose(reps, reps, ["sparse"], loss=0.1, vocab_size=8)
    assert any("lexical weights are all zero" in w for w in warnings)
    with pytest.raises(ValueError, match="diagnostics_steps"):
        TrainingDiagnostics(0, "unused")


def _records(folder):
    with open(os.path.join(folder, "diagnostics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "eval" not in r]


def test_trainer_writes_diagnostics_every_n_steps(tmp_path, splade_tiny_dir):
    # each query's first hard negative is the query's own text: a sure false-negative suspect (cosine 1)
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i, (query, doc) in enumerate(PAGES):
            f.write(json.dumps({"query": query, "pos": [doc], "neg": [query, PAGES[(i + 1) % len(PAGES)][1]]}) + "\n")
    out = tmp_path / "o"
    trainer = build_trainer(*parse_args(common_args(splade_tiny_dir, str(data), out, max_steps=3, save_steps=100,
                                                    diagnostics_steps=3, gradient_accumulation_steps=2,
                                                    per_device_train_batch_size=2)))
    prepare_output_dir(trainer.args, resuming=False)
    trainer.train()
    trainer.save_final()
    folder = out / "diagnostics"  # carried over by the final save
    records = _records(folder)
    assert [r["step"] for r in records] == [1, 3]  # once per optimiser step, not per micro-batch
    for r in records:
        dense = r["heads"]["dense"]
        assert 0 <= dense["accuracy"] <= 0.5 and dense["candidates"] == 2 * 3
        assert dense["negatives_above_positive"] >= 0.5
        assert math.isfinite(dense["uniformity"]) and dense["norm_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["loss_parts"] and r["warnings"] == []
    logged = [h for h in trainer.state.log_history if "diag_accuracy" in h]
    assert [h["step"] for h in logged] == [1, 3]
    with open(folder / "diagnostics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| dense |" in (folder / "report.md").read_text()
    with open(folder / "false_negative_suspects.jsonl") as f:
        suspects = [json.loads(line) for line in f]
    expected = sum(round(r["heads"]["dense"]["negatives_above_positive"] * 2 * 2) for r in records)
    assert len(suspects) == expected
    queries, docs = {q.lower() for q, _ in PAGES}, {d.lower() for _, d in PAGES}  # an uncased tokenizer
    assert sum(s["negative"] == s["query"] for s in suspects) == 2 * len(records)
    for s in suspects:
        assert s["negative_score"] > s["positive_score"]
        assert s["query"] in queries and s["positive"] in docs and s["negative"] in docs | queries


def test_unified_gradcache_diagnostics_and_collapse_warning(tmp_path, tiny_m3_dir, caplog):
    data = write_data(tmp_path / "train.jsonl")
    trainer = build_trainer(*parse_args(common_args(
        tiny_m3_dir, data, tmp_path / "o", max_steps=1, save_steps=100, training_mode="unified",
        per_device_train_batch_size=2,
        gradcache_chunk_size=3, diagnostics_steps=1, diagnostics_dir=str(tmp_path / "diag"))))
    # a collapsed model: the last layer norm maps every token to one vector
    norm = trainer.model.encoder.backbone.encoder.layer[-1].output.LayerNorm
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.normal_()
    with caplog.at_level(logging.WARNING, logger="trine.training.diagnostics"):
        trainer.train()
    records = _records(tmp_path / "diag")
    assert [r["step"] for r in records] == [1]
    first = records[0]
    assert set(first["heads"]) == {"dense", "sparse", "colbert"}
    assert set(first["loss_parts"]) >= {"dense", "sparse", "colbert", "ensemble"}
    assert first["heads"]["dense"]["mean_cosine"] == pytest.approx(1.0, abs=1e-4)
    logged = next(h for h in trainer.state.log_history if "sparse_nonzeros_passage" in h)  # the model's own count
    assert first["heads"]["sparse"]["passage"]["nonzeros_mean"] == pytest.approx(logged["sparse_nonzeros_passage"])
    assert first["heads"]["sparse"]["query"]["nonzeros_mean"] == pytest.approx(logged["sparse_nonzeros_query"])
    assert any("collapsing" in w for w in first["warnings"])
    assert any("collapsing" in r.getMessage() for r in caplog.records)


def test_schedule_eval_metrics_and_folder_policy(tmp_path):
    from types import SimpleNamespace

    from trine.errors import OutputPathError

    diag = TrainingDiagnostics(3, str(tmp_path / "d"))
    assert [s for s in range(1, 10) if diag.due(s)] == [1, 3, 6, 9]
    diag.on_log(None, SimpleNamespace(global_step=6), None, logs={"loss": 1.0, "eval_ndcg_at_10": 0.5})
    assert _records(tmp_path / "d") == []
    with open(tmp_path / "d" / "diagnostics.jsonl") as f:
        assert [json.loads(line) for line in f] == [{"eval": {"step": 6, "eval_ndcg_at_10": 0.5}}]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not trine's")
    with pytest.raises(OutputPathError, match="trine did not write"):
        TrainingDiagnostics(3, str(foreign))
    assert not TrainingDiagnostics(3, str(tmp_path / "d"), main_process=False).due(1)


def _global_batch(seed=3):
    """4 queries in groups of 3 with dense vectors, lexical weights and ColBERT vectors of ragged lengths:
    rank 1 (rows 2-3 of the queries, 6-11 of the passages) holds the longest texts, so a gather must pad."""
    rng = np.random.default_rng(seed)
    q, p = _fixed_batch()
    batch = {"q": {"dense_vecs": torch.tensor(q)}, "p": {"dense_vecs": torch.tensor(p)}}
    lengths = {"q": [2, 3, 5, 1], "p": [3, 2, 3, 1, 2, 3, 5, 4, 2, 1, 5, 3]}
    inputs = {}
    for side, name in (("q", "queries"), ("p", "passages")):
        n, width = len(lengths[side]), max(lengths[side])
        mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths[side]])
        ids = torch.tensor(rng.integers(1, 20, size=(n, width))) * mask
        weights = torch.tensor(rng.uniform(0, 1, size=(n, width)) * (rng.uniform(size=(n, width)) > 0.3)) * mask
        colbert = torch.tensor(rng.normal(size=(n, width, 4))) * mask[..., None]
        batch[side].update(token_weights=weights, input_ids=ids, colbert_vecs=colbert, colbert_mask=mask.bool())
        inputs[name] = {"input_ids": ids, "attention_mask": mask}
    return batch["q"], batch["p"], inputs


def _local(tensors, rows):
    """A rank's rows, padded only to the longest of them (as its own collator pads)."""
    out = {}
    for key, value in tensors.items():
        value = value[rows]
        if value.dim() > 1 and key != "dense_vecs":
            mask = next(tensors[m][rows] for m in ("colbert_mask", "attention_mask", "input_ids") if m in tensors)
            width = int((mask != 0).sum(1).max())
            value = value[:, :width]
        out[key] = value
    return out


def _diag_gather_worker(rank, world_size, rendezvous, out_dir):
    import torch.distributed as dist

    from trine.training.diagnostics import gather_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        q, p, inputs = _global_batch()
        qs, ps = slice(2 * rank, 2 * rank + 2), slice(6 * rank, 6 * rank + 6)
        local_inputs = {"queries": _local(inputs["queries"], qs), "passages": _local(inputs["passages"], ps)}
        gq, gp, gathered_inputs = gather_batch(_local(q, qs), _local(p, ps), local_inputs)
        record, _ = diagnose(gq, gp, ["dense", "sparse", "colbert"], loss=0.5, vocab_size=20)
        torch.save({"q": gq, "p": gp, "inputs": gathered_inputs, "record": record}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_batch_diagnostics_equal_one_process_on_the_global_batch(tmp_path):
    """Under DDP with cross-device negatives each rank's slice is gathered (ragged lengths padded) and the
    diagnostics equal one process's on the whole batch, not rank 0's local half."""
    import torch.multiprocessing as mp

    mp.spawn(_diag_gather_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    q, p, inputs = _global_batch()
    heads = ["dense", "sparse", "colbert"]
    one, _ = diagnose(q, p, heads, loss=0.5, vocab_size=20)
    local, _ = diagnose(_local(q, slice(0, 2)), _local(p, slice(0, 6)), heads, loss=0.5, vocab_size=20)
    assert local["heads"]["dense"]["candidates"] == 6 and one["heads"]["dense"]["candidates"] == 12
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        for side, want in (("q", q), ("p", p), *inputs.items()):
            tensors = got[side] if side in ("q", "p") else got["inputs"][side]
            assert set(tensors) == set(want)
            for key in want:
                assert torch.equal(tensors[key], want[key]), (side, key)
        record = got["record"]
        for head in heads:
            for key, value in one["heads"][head].items():
                if isinstance(value, float):
                    assert record["heads"][head][key] == pytest.approx(value, abs=1e-9), (head, key)
            assert record["heads"][head]["suspects"] == one["heads"][head]["suspects"]
            assert record["heads"][head]["margins"] == pytest.approx(one["heads"][head]["margins"], abs=1e-9)
        for side in ("query", "passage"):
            assert record["heads"]["sparse"][side] == pytest.approx(one["heads"]["sparse"][side], abs=1e-9)
    assert 0 < one["heads"]["dense"]["accuracy"] < 1


def test_torchrun_two_ranks_diagnose_the_global_batch_as_one_process(tmp_path, splade_tiny_dir):
    """2 ranks of 2 queries with cross-device negatives record the diagnostics 1 rank of 4 records."""
    import subprocess
    import sys

    from test_finetune import no_dropout_copy

    model = no_dropout_copy(splade_tiny_dir, tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    options = {"max_steps": 2, "save_steps": 100, "diagnostics_steps": 1}
    subprocess.run([sys.executable, "-m", "trine.training.finetune", *common_args(model, data, tmp_path / "one",
                                                                                    **options)],
                   check=True, env=env, capture_output=True, timeout=600)
    two = common_args(model, data, tmp_path / "two", per_device_train_batch_size=2, negatives_cross_device=True,
                      **options)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29600 + os.getpid() % 300), "-m", "trine.training.finetune", *two],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _records(tmp_path / "one" / "diagnostics"), _records(tmp_path / "two" / "diagnostics")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        da, db = a["heads"]["dense"], b["heads"]["dense"]
        assert db["queries"] == da["queries"] == 4 and db["candidates"] == da["candidates"] == 12
        for key in ("accuracy", "negatives_above_positive"):
            assert db[key] == da[key], key
        for key in ("margin_mean", "margin_in_batch_mean", "alignment", "uniformity", "mean_cosine", "norm_mean"):
            assert db[key] == pytest.approx(da[key], abs=2e-5), key
        assert db["margins"] == pytest.approx(da["margins"], abs=2e-5)
        assert b["suspects"] == a["suspects"]
