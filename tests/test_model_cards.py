"""Model cards (trine.cards): every folder trine writes carries a Hugging Face model card whose front matter is
valid YAML and whose numbers are the run's own (checked against the trainer's log, the data files themselves and
`trine eval`'s results.json)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml
from conftest import to_argv
from test_finetune import PAGES, common_args, write_data

from trine.cards import CARD_DATA_FILE, CARD_FILE, read_card
from trine.cli import main as cli_main
from trine.training.common import train_and_save
from trine.training.finetune import build_trainer, parse_args


def split_card(path: str) -> tuple[dict, str]:
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def write_beir(folder) -> str:
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as c, open(folder / "queries.jsonl", "w") as q:
        for i, (query, doc) in enumerate(PAGES):
            c.write(json.dumps({"_id": f"d{i}", "title": "", "text": doc}) + "\n")
            q.write(json.dumps({"_id": f"q{i}", "text": query}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(PAGES))))
    return str(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, splade_tiny_dir):
    """A fine-tuned tiny M3 model (heads started neutral) with retrieval evaluation during training, and its
    trainer (for the log the card must reflect)."""
    tmp = tmp_path_factory.mktemp("card")
    data = write_data(tmp / "train.jsonl")
    beir = write_beir(tmp / "beir")
    out = tmp / "model"
    argv = common_args(splade_tiny_dir, data, out, max_steps=4, save_steps=100, eval_data=beir,
                       retrieval_eval_steps=2, unified_finetuning=True, init_missing_heads="neutral")
    seen = {}

    def build(*parsed):
        seen["trainer"] = build_trainer(*parsed)
        return seen["trainer"]

    train_and_save(*parse_args(argv), build)
    return {"out": str(out), "data": data, "beir": beir, "trainer": seen["trainer"], "base": splade_tiny_dir}


def test_finetuned_model_card_holds_the_runs_facts(trained):
    meta, body = split_card(os.path.join(trained["out"], CARD_FILE))
    assert meta["library_name"] == "trine" and meta["base_model"] == trained["base"]
    assert meta["pipeline_tag"] == "sentence-similarity" and "bge-m3" in meta["tags"]
    card = read_card(trained["out"])
    assert card.written_by == "finetune" and card.model_type == "m3"
    # the data file: its path, its number of records, its SHA-256 computed here independently
    digest = hashlib.sha256(open(trained["data"], "rb").read()).hexdigest()
    assert card.data == [{"path": os.path.abspath(trained["data"]), "records": len(PAGES), "sha256": digest}]
    assert digest in body and os.path.abspath(trained["data"]) in body
    # final losses and evaluations: the trainer's own log
    history = trained["trainer"].state.log_history
    last = [h for h in history if "loss" in h][-1]
    assert card.losses["loss"] == pytest.approx(last["loss"])
    assert {k for k in last if k.startswith("loss_")} <= set(card.losses)
    evals = [(h["step"], h["eval_ndcg_at_10"]) for h in history if "eval_ndcg_at_10" in h]
    assert [(e["step"], e["metrics"]["dense"]["ndcg_at_10"]) for e in card.evaluations] == evals
    assert card.training["global_step"] == 4
    # the full configuration, by group, as run
    assert card.config["training"]["learning_rate"] == 1e-4 and card.config["data"]["train_group_size"] == 3
    assert card.config["model"]["model_name_or_path"] == trained["base"]
    assert "```yaml" in body and "learning_rate: 0.0001" in body
    # how to load it and the versions
    assert "BGEM3FlagModel(" in body and "M3Embedder(" in body and "SentenceTransformer(" in body
    assert card.versions["torch"] and card.versions["transformers"] and "| torch |" in body


def test_eval_model_card_adds_the_results_of_trine_eval(trained, tmp_path):
    # a copy, so the module's model stays as training left it
    import shutil

    model = str(tmp_path / "m")
    shutil.copytree(trained["out"], model)
    report = tmp_path / "report"
    assert cli_main(["eval", "--data", trained["beir"], "--model", model, "--modes", "dense,sparse", "--k", "10",
                     "--metrics", "ndcg", "--quiet", "--model-card", "--out", str(report)]) == 0
    results = json.load(open(report / "results.json"))
    metrics = next(iter(results["models"].values()))["metrics"]
    card = read_card(model)
    assert card.evaluations[-1]["source"] == "trine eval"
    assert card.evaluations[-1]["metrics"] == metrics
    assert card.written_by == "finetune" and card.data  # the training facts stay
    meta, _ = split_card(os.path.join(model, CARD_FILE))
    listed = {(r["task"]["name"], m["type"]): m["value"] for r in meta["model-index"][0]["results"]
              for m in r["metrics"]}
    assert listed[("Retrieval (dense)", "ndcg_at_10")] == pytest.approx(metrics["dense"]["ndcg@10"], abs=1e-6)
    assert listed[("Retrieval (sparse)", "ndcg_at_10")] == pytest.approx(metrics["sparse"]["ndcg@10"], abs=1e-6)


def test_eval_model_card_refuses_folders_trine_did_not_write(trained, minilm_dir, tmp_path, capsys):
    assert cli_main(["eval", "--data", trained["beir"], "--model", minilm_dir, "--modes", "dense", "--quiet",
                     "--model-card"]) == 2
    assert "trine wrote" in capsys.readouterr().err
    # a trine folder whose README.md is someone else's text is not replaced
    import shutil

    model = tmp_path / "m"
    shutil.copytree(trained["out"], model)
    os.remove(model / CARD_DATA_FILE)
    (model / CARD_FILE).write_text("my notes\n")
    assert cli_main(["eval", "--data", trained["beir"], "--model", str(model), "--modes", "dense", "--quiet",
                     "--model-card"]) == 2
    assert (model / CARD_FILE).read_text() == "my notes\n"


def test_exports_inherit_the_training_card(trained, tmp_path):
    out = tmp_path / "onnx"
    assert cli_main(["export", trained["out"], str(out), "--to", "onnx"]) == 0
    card = read_card(str(out))
    source = read_card(trained["out"])
    assert card.written_by == "export --to onnx" and card.model_type == "onnx"
    assert card.source == os.path.abspath(trained["out"]) and card.data == source.data
    assert card.losses == source.losses
    meta, body = split_card(os.path.join(out, CARD_FILE))
    assert "onnx" in meta["tags"] and 'backend="onnx"' in body


def test_reranker_and_pretraining_cards(tmp_path, splade_tiny_dir):
    from trine.training.pretrain import main as pretrain_main
    from trine.training.reranker import main as reranker_main

    data = write_data(tmp_path / "train.jsonl")
    assert reranker_main(to_argv({
        "model_name_or_path": splade_tiny_dir, "train_data": [data], "output_dir": str(tmp_path / "rr"),
        "train_group_size": 3, "per_device_train_batch_size": 4, "query_max_len": 16, "passage_max_len": 32,
        "max_steps": 2, "logging_steps": 1, "report_to": "none", "use_cpu": True})) == 0
    card = read_card(str(tmp_path / "rr"))
    meta, body = split_card(str(tmp_path / "rr" / CARD_FILE))
    assert card.written_by == "finetune-reranker" and meta["pipeline_tag"] == "text-ranking"
    assert "FlagReranker(" in body and card.data[0]["records"] == len(PAGES)

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for _, doc in PAGES))
    assert pretrain_main(to_argv({
        "model_name_or_path": splade_tiny_dir, "train_data": [str(corpus)], "output_dir": str(tmp_path / "pt"),
        "max_seq_length": 32, "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1,
        "report_to": "none", "use_cpu": True})) == 0
    folder = tmp_path / "pt" / "encoder_model"
    card = read_card(str(folder))
    meta, body = split_card(str(folder / CARD_FILE))
    assert card.written_by == "pretrain" and meta["pipeline_tag"] == "fill-mask"
    assert card.data[0]["records"] == len(PAGES) and "loss" in card.losses
    assert "trine finetune --model_name_or_path" in body
