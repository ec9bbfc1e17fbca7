"""LoRA adapters (trine.modeling.lora) on the tri-head model and the cross-encoder: adapter folders that peft's own
PeftModel.from_pretrained loads on the base model with the same outputs, trine merge-lora, option errors, and a
training step with gradient checkpointing and bf16. (The decoder family's LoRA training, resume and merge are in
test_decoder_embedder.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import TEXTS, make_tiny_reranker, to_argv
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from trine import CrossEncoder, M3Embedder, Reranker, TriHeadModel
from trine.cli import main as cli
from trine.errors import OptionError
from trine.modeling.lora import LoraOptions, add_lora, has_lora, is_adapter_folder, merge_lora_folder
from trine.training.arguments import ModelArguments


def perturb_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA's B starts at zero (the adapter a no-op): give it values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_trihead_adapter_loads_with_peft_and_merges(splade_tiny_dir, tmp_path):
    model = TriHeadModel.from_pretrained(splade_tiny_dir, init_missing_heads="random")
    add_lora(model.backbone, LoraOptions(lora_rank=4, lora_alpha=8), base_path=splade_tiny_dir,
             task_type="FEATURE_EXTRACTION")
    assert has_lora(model.backbone)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # peft's default targets for BERT, base frozen
    perturb_adapter(model.backbone)
    folder = str(tmp_path / "adapter")
    model.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "colbert_linear.pt", "sparse_linear.pt"} <= files
    assert "model.safetensors" not in files

    # the independent reference: peft's own loading on the base model, CLS pooling by hand
    base = AutoModel.from_pretrained(splade_tiny_dir)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    ours = M3Embedder(folder, show_progress=False)
    enc = ours.tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        cls = peft_model(**enc).last_hidden_state[:, 0]
    reference = torch.nn.functional.normalize(cls, dim=-1).numpy()
    got = ours.encode(TEXTS[:3], return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(got["dense_vecs"], reference, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = torch.nn.functional.normalize(peft_model(**enc).last_hidden_state[:, 0], dim=-1).numpy()
    assert np.abs(plain - got["dense_vecs"]).max() > 1e-3  # the adapter is really applied

    # merged: a plain BGE-M3-layout folder with the same three outputs
    merged = str(tmp_path / "merged")
    merge_lora_folder(folder, merged)
    assert {"model.safetensors", "colbert_linear.pt", "sparse_linear.pt"} <= set(os.listdir(merged))
    assert "adapter_config.json" not in os.listdir(merged)
    again = M3Embedder(merged, show_progress=False).encode(TEXTS[:3], return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(again["dense_vecs"], got["dense_vecs"], atol=1e-5)
    for a, b in zip(again["colbert_vecs"], got["colbert_vecs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(again["lexical_weights"], got["lexical_weights"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_cross_encoder_adapter_trains_the_classifier_and_merges(splade_tiny_dir, tmp_path):
    base_dir = make_tiny_reranker(str(tmp_path / "base"), splade_tiny_dir, "bert")
    ce = CrossEncoder.from_pretrained(base_dir)
    add_lora(ce.model, LoraOptions(lora_rank=4, lora_alpha=8, lora_dropout=0.0), base_path=base_dir,
             task_type="SEQ_CLS", extra_modules_to_save=("classifier", "score"))
    trainable = [n for n, p in ce.model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    perturb_adapter(ce.model, seed=1)
    with torch.no_grad():  # the classifier copy trained in full: change it too
        for n, p in ce.model.named_parameters():
            if "classifier" in n and "modules_to_save" in n:
                p.add_(0.3)
    folder = str(tmp_path / "adapter")
    ce.save_pretrained(folder)
    pairs = [("reset password", TEXTS[0]), ("file modes", TEXTS[1]), ("socket", TEXTS[5])]
    ours = np.array(Reranker(folder, show_progress=False).compute_score(pairs))
    reference_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1), folder).eval()
    enc = ce.tokenizer([q for q, _ in pairs], [p for _, p in pairs], return_tensors="pt", padding=True,
                       truncation="only_second", max_length=512)
    with torch.no_grad():
        reference = reference_model(**enc).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert cli(["merge-lora", folder, str(tmp_path / "merged")]) == 0
    merged = np.array(Reranker(str(tmp_path / "merged"), show_progress=False).compute_score(pairs))
    np.testing.assert_allclose(merged, ours, atol=1e-5)


def test_merge_lora_refuses_bad_input_and_foreign_output(splade_tiny_dir, tmp_path, capsys):
    assert cli(["merge-lora", splade_tiny_dir, str(tmp_path / "out")]) == 2  # not an adapter folder
    assert "adapter_config.json" in capsys.readouterr().err
    model = TriHeadModel.from_pretrained(splade_tiny_dir, with_heads=False)
    add_lora(model.backbone, LoraOptions(lora_rank=2), base_path=splade_tiny_dir, task_type="FEATURE_EXTRACTION")
    folder = str(tmp_path / "adapter")
    model.save_pretrained(folder)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli(["merge-lora", folder, str(foreign)]) == 2
    assert os.listdir(foreign) == ["notes.txt"]
    config = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    assert cli(["merge-lora", folder, str(tmp_path / "out2")]) == 2
    assert "--base" in capsys.readouterr().err
    assert cli(["merge-lora", folder, str(tmp_path / "out2"), "--base", splade_tiny_dir]) == 0


def test_lora_option_errors(splade_tiny_dir):
    model = TriHeadModel.from_pretrained(splade_tiny_dir, with_heads=False)
    with pytest.raises(OptionError, match="target_modules"):
        add_lora(model.backbone, LoraOptions(target_modules=("q_proj",)), base_path=splade_tiny_dir,
                 task_type="FEATURE_EXTRACTION")
    with pytest.raises(OptionError, match="modules_to_save"):
        add_lora(model.backbone, LoraOptions(modules_to_save=("lm_head",)), base_path=splade_tiny_dir,
                 task_type="FEATURE_EXTRACTION")
    with pytest.raises(OptionError, match="lora_rank"):
        LoraOptions(lora_rank=0)
    with pytest.raises(ValueError, match="need use_lora"):
        ModelArguments(model_name_or_path=splade_tiny_dir, target_modules=["query"])
    with pytest.raises(OptionError, match="lora_dropout"):
        ModelArguments(model_name_or_path=splade_tiny_dir, use_lora=True, lora_dropout=1.5)


def test_lora_training_with_gradient_checkpointing_and_bf16(splade_tiny_dir, tmp_path):
    from trine.training.finetune import finetune, parse_args

    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"query": TEXTS[i], "pos": [TEXTS[i + 4]], "neg": [TEXTS[(i + 5) % 8]]}) + "\n")
    out = tmp_path / "out"
    finetune(*parse_args(to_argv({
        "model_name_or_path": splade_tiny_dir, "train_data": [str(data)], "output_dir": str(out), "train_group_size": 2,
        "per_device_train_batch_size": 2, "query_max_len": 16, "passage_max_len": 32, "learning_rate": 1e-2,
        "max_steps": 2, "report_to": "none", "use_cpu": True, "use_lora": True, "lora_rank": 2,
        "gradient_checkpointing": True, "bf16": True, "save_strategy": "no",
    })))
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(torch.isfinite(v).all() for v in b)
    assert max(float(v.abs().max()) for v in b) > 0  # B starts at zero: gradients reached the adapter
    assert os.path.isfile(out / "1_Pooling" / "config.json")


def test_finetune_reranker_trains_a_lora_adapter_from_the_command_line(splade_tiny_dir, tmp_path):
    """`trine finetune-reranker --use_lora`: only the adapter (and the new classifier) train, the output is an
    adapter folder that peft loads on the base with trine's scores, and merge-lora gives the same scores."""
    from test_finetune import write_data

    from trine.training.reranker import main as reranker_main

    base_dir = make_tiny_reranker(str(tmp_path / "base"), splade_tiny_dir, "bert")
    data = write_data(tmp_path / "train.jsonl")
    out = tmp_path / "rr"
    assert reranker_main(to_argv({
        "model_name_or_path": base_dir, "train_data": [data], "output_dir": str(out), "train_group_size": 3,
        "per_device_train_batch_size": 4, "query_max_len": 16, "passage_max_len": 32, "max_steps": 2,
        "learning_rate": 1e-2, "logging_steps": 1, "report_to": "none", "use_cpu": True, "use_lora": True,
        "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0})) == 0
    assert is_adapter_folder(str(out))
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("lora_B" in k for k in adapter) and all(
        v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained: B left zero
    pairs = [("reset password", TEXTS[0]), ("file modes", TEXTS[1])]
    ours = np.array(Reranker(str(out), show_progress=False).compute_score(pairs))
    reference_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1), str(out)).eval()
    tok = CrossEncoder.from_pretrained(str(out)).tokenizer
    enc = tok([q for q, _ in pairs], [p for _, p in pairs], return_tensors="pt", padding=True,
              truncation="only_second", max_length=512)
    with torch.no_grad():
        np.testing.assert_allclose(ours, reference_model(**enc).logits[:, 0].numpy(), atol=1e-5)
    assert cli(["merge-lora", str(out), str(tmp_path / "merged")]) == 0
    merged = np.array(Reranker(str(tmp_path / "merged"), show_progress=False).compute_score(pairs))
    np.testing.assert_allclose(merged, ours, atol=1e-5)
