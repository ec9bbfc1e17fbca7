"""Issue 28's quality bar on two data sets with one recipe: the demo's (Debian man pages) and Debian's
package descriptions, which the project never tuned for.

Both go through the demo's own functions (``trine.demo``: training pairs, the start model with the
BM25-fitted lexical head, one epoch of unified fine-tuning with self-distillation, evaluation with the
fusion tuned on the dev split), so a lever measured here is one change of the demo's recipe
(``--set name=value``, any training argument) applied to both sets alike.

    python benchmarks/heads.py --data debian                         # the baseline on package descriptions
    python benchmarks/heads.py --data manpages                       # the baseline on the demo's data
    python benchmarks/heads.py --data debian --set sparse_flops_weight=1e-3 --label flops1e-3

The package-description set: query = a package's one-line synopsis, document = its long description
(Debian's English ``Translation-en`` of bookworm main, fetched by ``apt-get update`` into a private lists
folder under the cache, so the system's package lists are untouched). Descriptions under
``MIN_WORDS`` words are dropped, and so is every package whose long description or synopsis another
package shares (families such as ``foo``/``foo-data`` often do: a query with several right answers
judged as one). A seeded shuffle then takes 5,000 documents: 480 test queries, 240 dev queries (fusion
weights), 1,920 training pairs, the rest distractors; every query's own description is its only
relevant document, and training queries are disjoint from dev and test.

Everything lives under ``~/.cache/trine/bench/heads`` (``TRINE_BENCH_CACHE`` moves it): the data sets,
one folder per run (``runs/<data>-<label>``) and ``results.jsonl`` (one line per run: options, nDCG@10 of
every mode, the lexical head's non-zeros per text, each phase's time, the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import time

CACHE = os.path.join(os.environ.get("TRINE_BENCH_CACHE", os.path.expanduser("~/.cache/trine/bench")), "heads")
SEED = 0
N_DOCS, N_TEST, N_DEV, N_TRAIN = 5000, 480, 240, 1920
MIN_WORDS = 15  # a long description shorter than this says little more than its synopsis
TRANSLATION = "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"


def fetch_translations(lists: str) -> str:
    """Debian's English package descriptions (``Translation-en``) in ``lists``, fetched once with
    ``apt-get update`` into that folder (the system's own lists carry no long descriptions here)."""
    path = os.path.join(lists, TRANSLATION)
    if os.path.exists(path):
        return path
    if shutil.which("apt-get") is None:
        raise SystemExit("apt-get is missing: the package-description set needs Debian's Translation-en file")
    os.makedirs(os.path.join(lists, "partial"), exist_ok=True)
    subprocess.run(["apt-get", "-q", "-o", f"Dir::State::Lists={lists}", "-o", "Acquire::Languages=en",
                    "-o", "Acquire::IndexTargets::deb::Packages::DefaultEnabled=false", "update"], check=True)
    if not os.path.exists(path):
        raise SystemExit(f"apt-get update did not write {path}")
    return path


def parse_translations(text: str) -> list[tuple[str, str, str]]:
    """``(package, synopsis, long description)`` of each stanza; the long description's ``" ."`` lines
    become paragraph breaks, its other lines are joined with spaces."""
    records = []
    for stanza in text.split("\n\n"):
        package = re.search(r"^Package: (.+)$", stanza, re.M)
        described = re.search(r"^Description-en: (.*)\n((?: .*(?:\n|$))*)", stanza, re.M)
        if not package or not described:
            continue
        paragraphs, lines = [], []
        for line in described.group(2).splitlines():
            if line.strip() == ".":
                if lines:
                    paragraphs.append(" ".join(lines))
                lines = []
            else:
                lines.append(line.strip())
        if lines:
            paragraphs.append(" ".join(lines))
        records.append((package.group(1).strip(), described.group(1).strip(), "\n".join(paragraphs)))
    return records


def select_packages(records: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop near-empty long descriptions and every package whose synopsis or description is not unique
    (case and spacing ignored), sorted by package name (the seeded shuffle's stable input)."""
    def key(s: str) -> str:
        return " ".join(s.lower().split())

    kept = [r for r in records if len(r[2].split()) >= MIN_WORDS and r[1]]
    synopses: dict[str, int] = {}
    bodies: dict[str, int] = {}
    for _, synopsis, body in kept:
        synopses[key(synopsis)] = synopses.get(key(synopsis), 0) + 1
        bodies[key(body)] = bodies.get(key(body), 0) + 1
    unique = {r[0]: r for r in kept if synopses[key(r[1])] == 1 and bodies[key(r[2])] == 1}
    return [unique[p] for p in sorted(unique)]


def build_debian_beir(folder: str) -> str:
    """The package-description set as a BEIR folder (corpus, queries, qrels train/dev/test); kept once built."""
    from trine.io import atomic_folder

    if os.path.exists(os.path.join(folder, "qrels", "test.tsv")):
        return folder
    path = fetch_translations(os.path.join(CACHE, "apt-lists"))
    text = subprocess.run(["lz4", "-dc", path], check=True, capture_output=True, text=True).stdout
    packages = select_packages(parse_translations(text))
    if len(packages) < N_DOCS:
        raise SystemExit(f"only {len(packages)} usable package descriptions, {N_DOCS} needed")
    rng = random.Random(SEED)
    rng.shuffle(packages)
    docs = packages[:N_DOCS]
    splits = {"test": docs[:N_TEST], "dev": docs[N_TEST:N_TEST + N_DEV],
              "train": docs[N_TEST + N_DEV:N_TEST + N_DEV + N_TRAIN]}
    with atomic_folder(folder, overwrite=True) as tmp:
        with open(os.path.join(tmp, "corpus.jsonl"), "w") as f:
            for name, _, body in docs:
                f.write(json.dumps({"_id": name, "title": "", "text": body}) + "\n")
        with open(os.path.join(tmp, "queries.jsonl"), "w") as f:
            for name, synopsis, _ in docs[:N_TEST + N_DEV + N_TRAIN]:
                f.write(json.dumps({"_id": "q:" + name, "text": synopsis}) + "\n")
        os.makedirs(os.path.join(tmp, "qrels"))
        for split, members in splits.items():
            with open(os.path.join(tmp, "qrels", f"{split}.tsv"), "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for name, _, _ in members:
                    f.write(f"q:{name}\t{name}\t1\n")
    return folder


def build_beir(data: str) -> str:
    """The BEIR folder of ``data``: ``debian`` (above) or ``manpages`` (the demo's own split)."""
    folder = os.path.join(CACHE, data, "beir")
    if data == "debian":
        return build_debian_beir(folder)
    from trine.evaluation.manpages import build_manpages_beir

    if os.path.exists(os.path.join(folder, "qrels", "test.tsv")):
        return folder
    return build_manpages_beir(folder, seed=0, test_fraction=0.2, dev_fraction=0.1, overwrite=True,
                               update_package_lists=True)  # the split run_end_to_end makes


def lexical_nonzeros(model: str, queries: list[str], passages: list[str]) -> dict[str, float]:
    """Mean non-zero lexical weights per query and per passage (the lengths the evaluation encodes with)."""
    from trine import M3Embedder

    embedder = M3Embedder(model, show_progress=False, query_max_length=32, passage_max_length=256)
    q = embedder.encode_queries(queries, return_dense=False, return_sparse=True, return_colbert_vecs=False)
    p = embedder.encode_corpus(passages, return_dense=False, return_sparse=True, return_colbert_vecs=False)

    def mean(weights: list[dict]) -> float:
        return sum(sum(1 for w in d.values() if w > 0) for d in weights) / len(weights)

    return {"query": mean(q["lexical_weights"]), "passage": mean(p["lexical_weights"])}


def parse_set(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set {item!r}: expected name=value (a training argument)")
        options[name] = value
    return options


def main(argv: list[str] | None = None) -> dict:
    from trine.demo import evaluate_models, finetune_unified, print_evaluation, start_models, write_train_pairs
    from trine.evaluation import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, choices=["debian", "manpages"])
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="training arguments replacing the demo recipe's (the lever measured)")
    parser.add_argument("--label", default=None, help="the run's name (default: baseline, or the --set items)")
    parser.add_argument("--zero-shot", action="store_true", help="also evaluate the start model")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: one epoch)")
    parser.add_argument("--mine-negatives", type=int, default=0, metavar="N",
                        help="give each training pair N hard negatives mined by the start model's dense vectors "
                             "among the training positives (`trine mine`, ranks 2-50) and train with groups of N + 1 "
                             "(default 0: in-batch negatives only, the recipe's)")
    args = parser.parse_args(argv)
    options = parse_set(args.set)
    if args.mine_negatives:
        options.setdefault("train_group_size", str(args.mine_negatives + 1))
    label = args.label or ("+".join(f"{k}={v}" for k, v in options.items()) or "baseline")
    times: dict[str, float] = {}

    t = time.perf_counter()
    beir = build_beir(args.data)
    train, dev, test = (load_dataset(beir, s) for s in ("train", "dev", "test"))
    out = os.path.join(CACHE, "runs", f"{args.data}-{re.sub(r'[^A-Za-z0-9_.=+-]', '_', label)}")
    os.makedirs(out, exist_ok=True)
    pairs = os.path.join(out, "train_pairs.jsonl")
    passages = write_train_pairs(train, pairs)
    times["data"] = time.perf_counter() - t
    print(f"data ({args.data}): {len(train.qrels)} training pairs, {len(dev.queries)} dev queries, "
          f"{len(test.queries)} test queries over {len(test.corpus)} documents ({beir}) [{times['data']:.0f} s]")

    t = time.perf_counter()
    models = start_models(out, passages, "bm25", neutral_baseline=False)
    times["start model"] = time.perf_counter() - t
    if args.mine_negatives:
        from trine.cli import main as trine

        t = time.perf_counter()
        mined = os.path.join(out, "train_pairs_mined.jsonl")
        if os.path.exists(mined):
            os.remove(mined)  # the run's own output of an earlier try
        if trine(["mine", "--input_file", pairs, "--output_file", mined, "--model_name_or_path", models[-1],
                  "--range_for_sampling", "2-50", "--negative_number", str(args.mine_negatives), "--quiet"]) != 0:
            raise SystemExit("trine mine failed")
        pairs = mined
        times["mining"] = time.perf_counter() - t
    t = time.perf_counter()
    finetuned = finetune_unified(models[-1], pairs, os.path.join(out, "unified"), steps=args.steps,
                                 train_options=options)
    times["fine-tuning"] = time.perf_counter() - t
    t = time.perf_counter()
    result = evaluate_models([*models, finetuned] if args.zero_shot else [finetuned], test, dev)
    times["evaluation"] = time.perf_counter() - t
    print_evaluation(result)
    t = time.perf_counter()
    qids = sorted(test.queries)[:200]
    nonzeros = lexical_nonzeros(finetuned, [test.queries[q] for q in qids],
                                [test.corpus[d]["text"] for d in sorted(test.corpus)[:500]])
    times["non-zeros"] = time.perf_counter() - t
    metrics = {m: v["ndcg@10"] for m, v in result["models"][list(result["models"])[-1]]["metrics"].items()}
    load = os.getloadavg()[0]
    print(f"\nlexical non-zeros per text: {nonzeros['query']:.1f} per query, {nonzeros['passage']:.1f} per passage")
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f" (load average {load:.1f})")
    row = {"data": args.data, "label": label, "set": options, "steps": args.steps,
           "mine_negatives": args.mine_negatives, "ndcg@10": metrics,
           "nonzeros": nonzeros, "seconds": times, "load": load, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(CACHE, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
