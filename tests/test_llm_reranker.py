"""Decoder-only (LLM) rerankers (model_family 'llm-reranker'): a tiny random Llama causal LM with SmolLM2's real
tokenizer; scores against FlagEmbedding's FlagLLMReranker (default prompt and instructions, truncation, normalize),
training pairs and loss against its decoder-only reranker dataset and model, LoRA training through
`trine finetune-reranker`, the saved folder loading with no flag (FlagEmbedding loading it with peft_path),
merge-lora, and the folder family detection the --reranker options rely on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_reranker, require, to_argv
from safetensors.torch import load_file
from test_decoder_embedder import smol_tokenizer_dir  # noqa: F401 (the session fixture)
from test_finetune import PAGES, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from trine.curation.teacher import load_reranker_scorer
from trine.errors import InputError, OptionError
from trine.inference.reranker import Reranker
from trine.modeling.families import get_family, reranker_family
from trine.modeling.llm_reranker import DEFAULT_PROMPT, FAMILY_FILE, LLMReranker
from trine.modeling.lora import merge_lora_folder
from trine.training.data import Example
from trine.training.reranker import RerankerCollator, RerankerTrainingModel, main

FlagEmbedding = require("FlagEmbedding")

LONG = " ".join(d for _, d in PAGES[:6])  # a passage far over the test max_length (truncation)


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory, smol_tokenizer_dir) -> str:  # noqa: F811
    """A randomly initialised 2-layer Llama causal LM, written with plain transformers (not trine)."""
    out = str(tmp_path_factory.mktemp("tiny_llm_rr"))
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         initializer_range=0.2)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pairs() -> list[tuple[str, str]]:
    return [(q, d) for q, d in PAGES[:5]] + [(PAGES[0][0], LONG), (PAGES[1][0] * 6, PAGES[2][1])]


def test_scores_match_flagembedding(tiny_llm_dir):
    """Default prompt and "A: "/"B: " instructions, query and pair truncation, batches of mixed lengths, sigmoid."""
    assert reranker_family(tiny_llm_dir) == "llm-reranker"  # a plain causal-LM folder, detected from config.json
    ours = Reranker(tiny_llm_dir, devices="cpu", show_progress=False, batch_size=3)
    flag = FlagEmbedding.FlagLLMReranker(tiny_llm_dir, use_fp16=False, devices="cpu", batch_size=3)
    for options in ({}, {"max_length": 24}, {"max_length": 40, "query_max_length": 6}, {"normalize": True}):
        expected = flag.compute_score(pairs(), **options)
        got = ours.compute_score(pairs(), **options)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=str(options))
    assert len(set(np.round(got, 6))) == len(got)  # the pairs get different scores (not a constant)
    # another prompt and no instructions, as FlagEmbedding's options
    custom = dict(prompt="Does B answer A? Say Yes or No.", query_instruction_for_rerank=None,
                  passage_instruction_for_rerank=None)
    flag = FlagEmbedding.FlagLLMReranker(tiny_llm_dir, use_fp16=False, devices="cpu", **custom)
    ours = Reranker(tiny_llm_dir, devices="cpu", show_progress=False, **custom)
    np.testing.assert_allclose(ours.compute_score(pairs()), flag.compute_score(pairs()), atol=1e-5)
    other = "Is B about A?"  # a prompt for one call
    np.testing.assert_allclose(ours.compute_score(pairs(), prompt=other), flag.compute_score(pairs(), prompt=other),
                               atol=1e-5)
    assert np.max(np.abs(np.subtract(ours.compute_score(pairs(), prompt=other), ours.compute_score(pairs())))) > 1e-4


def test_score_is_read_at_each_rows_last_real_token(tiny_llm_dir):
    model = LLMReranker.from_pretrained(tiny_llm_dir).eval()
    ids, _ = model.tokenize_pairs([q for q, _ in pairs()], [d for _, d in pairs()], query_max_length=16,
                                  max_length=48)
    width = max(map(len, ids))
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in ids]).view(-1)
        right = model(torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                      torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))
        full = model.model(torch.tensor([ids[0]])).logits[0, -1, model.yes_id]
    np.testing.assert_allclose(right.numpy(), alone.numpy(), atol=1e-5)
    assert abs(float(full) - float(alone[0])) < 1e-5
    assert model.yes_id == model.tokenizer("Yes", add_special_tokens=False)["input_ids"][0]


def write_records(path) -> str:
    """Four records, the first with a passage over the length limit, the second with its own LLM prompt."""
    with open(path, "w") as f:
        for i, (q, d) in enumerate(PAGES[:4]):
            negatives = [PAGES[(i + k + 1) % len(PAGES)][1] for k in range(2)]
            record = {"query": q, "pos": [d if i else LONG], "neg": negatives}
            # FlagEmbedding's dataset (a datasets table) needs the field in every record or in none
            record["prompt"] = "Is B relevant to A?" if i == 1 else DEFAULT_PROMPT
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.mark.parametrize("sep_token", ["\n", " ||"])
def test_training_pairs_and_loss_match_flagembedding(tmp_path, tiny_llm_dir, sep_token):
    """FlagEmbedding's training lengths, instructions and per-record prompt; the group loss of the Yes logits."""
    from FlagEmbedding.abc.finetune.reranker import AbsRerankerDataArguments
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsLLMRerankerTrainDataset
    from FlagEmbedding.finetune.reranker.decoder_only.base.modeling import CrossDecoderModel

    file = write_records(tmp_path / "train.jsonl")
    qlen, plen = 16, 48
    data_args = AbsRerankerDataArguments(train_data=[file], train_group_size=3, query_max_len=qlen,
                                         passage_max_len=plen, query_instruction_for_rerank="A: ",
                                         passage_instruction_for_rerank="B: ", cache_path=str(tmp_path / "cache"),
                                         sep_token=sep_token)
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir, add_eos_token=False)
    tok.padding_side = "left"
    fe_data = AbsLLMRerankerTrainDataset(data_args, tok)

    ours = LLMReranker.from_pretrained(tiny_llm_dir)
    ours.set_sep_token(sep_token)  # what finetune-reranker's sep_token does
    collator = RerankerCollator(ours, query_max_len=qlen, passage_max_len=plen, query_instruction_for_retrieval="A: ",
                                passage_instruction_for_retrieval="B: ")
    records = [json.loads(line) for line in open(file)]
    examples = [Example(r["query"], [*r["pos"], *r["neg"]], None, r.get("prompt")) for r in records]
    batch = collator([{"examples": examples, "in_batch_negatives": False}])
    assert batch["group_size"] == 3
    mask = batch["pairs"]["attention_mask"]
    got = [row[: int(m.sum())].tolist() for row, m in zip(batch["pairs"]["input_ids"], mask)]
    for i in range(len(records)):
        expected = [p["input_ids"] for p in fe_data[i][0]]
        assert expected[0] == got[3 * i]  # the positive first
        assert sorted(expected[1:]) == sorted(got[3 * i + 1 : 3 * i + 3])  # FlagEmbedding draws negatives at random
    custom = tok("Is B relevant to A?", add_special_tokens=False)["input_ids"]
    assert got[3][-len(custom):] == custom and got[0][-len(custom):] != custom  # record 1's own prompt
    assert len(got[0]) == qlen + plen  # the long positive fills the pair to FlagEmbedding's training length

    # the loss: FlagEmbedding's model scores each pair alone (no padding), ours the right-padded batch
    model = RerankerTrainingModel(ours)
    out = model(batch["pairs"], batch["group_size"])
    fe_model = CrossDecoderModel(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), tokenizer=tok,
                                 train_batch_size=len(records))
    with torch.no_grad():
        fe_scores = torch.cat([fe_model.encode({"input_ids": torch.tensor([x]),
                                                "attention_mask": torch.ones(1, len(x), dtype=torch.long)})
                               for x in got])
    fe_loss = fe_model.compute_loss(fe_scores.view(-1, 3), torch.zeros(len(records), dtype=torch.long))
    np.testing.assert_allclose(out["scores"].detach().numpy(), fe_scores.numpy(), atol=1e-5)
    assert abs(out["loss"].item() - fe_loss.item()) < 1e-5


def test_lora_training_saves_a_folder_that_loads_everywhere(tmp_path, tiny_llm_dir):
    data = write_data(tmp_path / "train.jsonl", n_neg=2)
    out = tmp_path / "out"
    options = {"model_name_or_path": tiny_llm_dir, "model_family": "llm-reranker", "use_lora": True,
               "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "train_data": [data],
               "output_dir": str(out), "train_group_size": 3, "per_device_train_batch_size": 4,
               "query_max_len": 16, "passage_max_len": 48, "learning_rate": 1e-2, "max_steps": 4,
               "save_steps": 2, "logging_steps": 1, "report_to": "none", "seed": 11, "use_cpu": True,
               "query_instruction_for_rerank": "A: ", "passage_instruction_for_rerank": "B: "}
    assert main(to_argv(options)) == 0
    assert os.path.isfile(out / "adapter_config.json") and os.path.isdir(out / "checkpoint-2")
    assert json.loads((out / FAMILY_FILE).read_text()) == {"model_family": "llm-reranker", "prompt": DEFAULT_PROMPT,
                                                           "sep_token": "\n"}
    assert reranker_family(out) == "llm-reranker"
    assert get_family("llm-reranker", "reranker").lora_task_type == "CAUSAL_LM"
    # resuming from the step-2 checkpoint ends with the same adapter
    resumed = tmp_path / "resumed"
    assert main(to_argv({**options, "output_dir": str(resumed),
                         "resume_from_checkpoint": str(out / "checkpoint-2")})) == 0
    a, b = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (out, resumed))
    start = load_file(os.path.join(out, "checkpoint-2", "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)

    test_pairs = pairs()[:5]
    trained = Reranker(str(out), devices="cpu", show_progress=False)  # no flag: the folder says its family
    scores = trained.compute_score(test_pairs)
    base = Reranker(tiny_llm_dir, devices="cpu", show_progress=False).compute_score(test_pairs)
    assert np.max(np.abs(np.subtract(scores, base))) > 1e-3  # the adapter changed the scores
    flag = FlagEmbedding.FlagLLMReranker(tiny_llm_dir, peft_path=str(out), use_fp16=False, devices="cpu")
    np.testing.assert_allclose(scores, flag.compute_score(test_pairs), atol=1e-5)

    merged = merge_lora_folder(out, tmp_path / "merged")
    assert not os.path.exists(os.path.join(merged, "adapter_config.json"))
    assert reranker_family(merged) == "llm-reranker"
    np.testing.assert_allclose(Reranker(merged, devices="cpu", show_progress=False).compute_score(test_pairs),
                               scores, atol=1e-5)
    # trine score --reranker / eval --reranker load a folder this way (no family option)
    scorer = load_reranker_scorer(merged, devices="cpu", show_progress=False)
    assert type(scorer.reranker.model).__name__ == "LLMReranker"


def test_bad_options_and_folders(tiny_llm_dir, tmp_path, minilm_dir, capsys):
    with pytest.raises(OptionError, match="model_family"):
        Reranker(tiny_llm_dir, model_family="no-such", devices="cpu")
    with pytest.raises(OptionError, match="sep_token"):
        LLMReranker.from_pretrained(tiny_llm_dir, sep_token="")
    with pytest.raises(OptionError, match="prompt"):  # a cross-encoder takes no prompt
        Reranker(make_tiny_reranker(str(tmp_path / "ce"), minilm_dir, "bert"), prompt="x", devices="cpu")
    ce = str(tmp_path / "ce")
    data = write_data(tmp_path / "train.jsonl")
    argv = {"model_name_or_path": ce, "train_data": [data], "output_dir": str(tmp_path / "out"), "max_steps": 1,
            "train_group_size": 3, "report_to": "none", "use_cpu": True, "sep_token": " ||"}
    assert main(to_argv(argv)) == 2  # a cross-encoder has no separator option
    assert "sep_token" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
    folder = tmp_path / "bad"
    LLMReranker.from_pretrained(tiny_llm_dir).save_pretrained(folder)
    plain = {k: v for k, v in argv.items() if k != "sep_token"}
    assert main(to_argv({**plain, "model_name_or_path": str(folder)})) == 2  # the family the folder records
    assert "--model_family llm-reranker" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
    info = json.loads((folder / FAMILY_FILE).read_text())
    (folder / FAMILY_FILE).write_text(json.dumps({**info, "cutoff_layers": [1]}))
    with pytest.raises(InputError, match="unknown keys"):
        Reranker(str(folder), devices="cpu")
    (folder / FAMILY_FILE).write_text(json.dumps({**info, "model_family": "cross-encoder"}))
    with pytest.raises(InputError, match="model_family"):
        LLMReranker.from_pretrained(folder)
