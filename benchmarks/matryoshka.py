"""Matryoshka training against plain training, the same budget, in one run, on the demo's man-page set.

Issue 18's goal: at 64 dimensions, a Matryoshka-trained model loses (full-size nDCG@10 minus nDCG@10 of
its vectors cut to 64 dimensions and re-normalised) less than half of what plain truncation of the plainly
fine-tuned model loses.

Every arm starts from the same model (``<demo>/zero-shot``: all-MiniLM-L6-v2 with the demo's BM25-fitted
lexical head and its ColBERT head) and trains on the same pairs (``<demo>/train_pairs.jsonl``) with the
demo's unified fine-tuning (``trine demo``: unified loss + self-distillation, batch 32, in-batch negatives,
seed 0); per budget (epochs, learning rate) there is one plain arm and one Matryoshka arm per
``--weights`` (dimensions ``--dims``). Each trained model is evaluated on the demo's held-out test split
(487 queries over 2,435 man pages) with ``trine eval --dims``'s machinery (``EvalConfig.dims``: the
corpus encoded once, ``dense@<d>`` per dimension), query/passage lengths 32/256 as the demo's report.

    .venv/bin/trine demo                                                       # once: data + start model
    .venv/bin/python benchmarks/matryoshka.py --epochs 1 --weights 1,2,4,8 1,1,2,4 1,1,1,1 [--jobs 2]
    .venv/bin/python benchmarks/matryoshka.py --epochs 3 --learning_rate 5e-5 1e-4 --weights 1,2,4,8

A finished arm's result is kept in its folder (``bench.json`` with every option it was trained with) and
reused when the same arm is asked for again, so adding a budget or weights re-trains only the new arms.
Training runs as ``python -m trine.training.finetune`` child processes (logs beside the models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_LOCK = threading.Lock()  # arms trained side by side (--jobs) are evaluated one at a time


def train_options(demo: str, out: str, epochs: float, lr: float, dims: list[int], weights: Sequence[float] | None
                  ) -> dict:
    """``trine demo``'s fine-tuning options (src/trine/demo.py), with the budget and Matryoshka settings."""
    options = {
        "model_name_or_path": os.path.join(demo, "zero-shot"), "train_data": [os.path.join(demo, "train_pairs.jsonl")],
        "output_dir": out, "training_mode": "unified", "use_self_distill": True, "train_group_size": 1,
        "per_device_train_batch_size": 32, "query_max_len": 32, "passage_max_len": 128,
        "temperature": 0.05, "learning_rate": lr, "head_learning_rate": 1e-3, "warmup_steps": 0.1,
        "sparse_loss_weight": 0.3, "logging_steps": 10, "num_train_epochs": epochs,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0, "overwrite_output_dir": True,
    }
    if weights is not None:
        options["matryoshka_dims"] = list(dims)
        options["matryoshka_weights"] = list(weights)
    return options


def to_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return argv


def evaluate(model_dir: str, demo: str, dims: list[int]) -> dict[str, float]:
    """nDCG@10 of the full-size dense vectors and of each dimension in ``dims``."""
    from trine.evaluation import EvalConfig, load_dataset, run_evaluation

    test = load_dataset(os.path.join(demo, "beir"), "test")
    config = EvalConfig(modes=("dense",), k_values=(10,), metrics=("ndcg",), top_k=10, dims=tuple(dims),
                        query_max_length=32, passage_max_length=256)
    result = run_evaluation([model_dir], test, config, model_options={"show_progress": False})
    metrics = next(iter(result["models"].values()))["metrics"]
    return {mode: round(float(values["ndcg@10"]), 4) for mode, values in metrics.items()}


def arm_name(epochs: float, lr: float, weights: Sequence[float] | None) -> str:
    kind = "plain" if weights is None else "mrl-" + "-".join(f"{w:g}" for w in weights)
    return f"e{epochs:g}_lr{lr:g}_{kind}"


def trained_steps(model_dir: str) -> int | None:
    """The optimiser steps the run took, from the model card's facts (``trine_card.json``)."""
    card = os.path.join(model_dir, "trine_card.json")
    if not os.path.isfile(card):
        return None
    with open(card) as f:
        return json.load(f).get("training", {}).get("global_step")


def run_arm(args: argparse.Namespace, epochs: float, lr: float, weights: Sequence[float] | None) -> dict:
    out = os.path.join(args.out, arm_name(epochs, lr, weights))
    options = train_options(os.path.abspath(args.demo), out, epochs, lr, args.dims, weights)
    record_file = os.path.join(out, "bench.json")
    if os.path.isfile(record_file):
        with open(record_file) as f:
            record = json.load(f)
        if record["options"] == options and record["eval_dims"] == args.dims:
            print(f"{os.path.basename(out)}: reused {record_file}", flush=True)
            return {**record, "steps": record.get("steps") or trained_steps(out)}
    print(f"{os.path.basename(out)}: training ...", flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(out + ".log", "w") as log:
        subprocess.run([sys.executable, "-m", "trine.training.finetune", *to_argv(options)], check=True, env=env,
                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    train_s = time.perf_counter() - start
    steps = trained_steps(out)
    with EVAL_LOCK:
        ndcg = evaluate(out, args.demo, args.dims)
    record = {"options": options, "eval_dims": args.dims, "train_s": round(train_s, 1), "steps": steps,
              "ndcg@10": ndcg}
    with open(record_file, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{os.path.basename(out)}: {record['ndcg@10']} ({train_s:.0f} s training)", flush=True)
    return record


def row(label: str, ndcg: dict[str, float], dims: list[int], plain_loss: float | None) -> str:
    full = ndcg["dense"]
    cells = [f"{ndcg[f'dense@{d}']:.3f}" for d in dims]
    loss = full - ndcg[f"dense@{min(dims)}"]
    ratio = "" if plain_loss is None else f" ({loss / plain_loss:.2f}x plain's)" if plain_loss > 0 else ""
    return f"| {label} | {full:.3f} | " + " | ".join(cells) + f" | {loss:.3f}{ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default=os.path.join(ROOT, "outputs", "demo"),
                        help="the folder `trine demo` wrote (beir/, train_pairs.jsonl, zero-shot/)")
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_matryoshka"))
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64],
                        help="Matryoshka dimensions, trained and evaluated (largest first)")
    parser.add_argument("--weights", nargs="*", default=["1,1,1,1"],
                        help="one Matryoshka arm per comma-separated weight list (one weight per --dims entry)")
    parser.add_argument("--epochs", type=float, nargs="+", default=[1.0], help="budgets: epochs")
    parser.add_argument("--learning_rate", type=float, nargs="+", default=[5e-5], help="budgets: learning rates")
    parser.add_argument("--jobs", type=int, default=1, help="arms trained at the same time (child processes)")
    parser.add_argument("--with-start", action="store_true", help="also evaluate the start model (no training)")
    args = parser.parse_args()
    args.demo = os.path.abspath(args.demo)
    missing = [p for p in ("beir", "train_pairs.jsonl", "zero-shot") if not os.path.exists(os.path.join(args.demo, p))]
    if missing:
        raise SystemExit(f"{args.demo}: no {', '.join(missing)}; run `.venv/bin/trine demo` first (it writes them)")
    weight_lists = [tuple(float(w) for w in spec.split(",")) for spec in args.weights]
    for weights in weight_lists:
        if len(weights) != len(args.dims):
            raise SystemExit(f"--weights {weights}: one weight per dimension of --dims {args.dims}")

    table = [f"| arm | full | {' | '.join(str(d) for d in args.dims)} | loss at {min(args.dims)} |",
             "|---|" + "---|" * (len(args.dims) + 2)]
    if args.with_start:
        start_metrics = evaluate(os.path.join(args.demo, "zero-shot"), args.demo, args.dims)
        table.append(row("start model (no training)", start_metrics, args.dims, None))
    budgets = [(epochs, lr) for epochs in args.epochs for lr in args.learning_rate]
    arms = [(epochs, lr, weights) for epochs, lr in budgets for weights in (None, *weight_lists)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the training runs in child processes
        records = dict(zip(arms, pool.map(lambda arm: run_arm(args, *arm), arms)))
    summary = []
    for epochs, lr in budgets:
        plain = records[(epochs, lr, None)]
        plain_loss = plain["ndcg@10"]["dense"] - plain["ndcg@10"][f"dense@{min(args.dims)}"]
        budget = f"{epochs:g} epoch{'s' if epochs != 1 else ''} ({plain['steps']} steps), lr {lr:g}"
        table.append(row(f"plain, {budget}", plain["ndcg@10"], args.dims, None))
        for weights in weight_lists:
            mrl = records[(epochs, lr, weights)]
            label = f"Matryoshka {','.join(f'{w:g}' for w in weights)}, {budget}"
            table.append(row(label, mrl["ndcg@10"], args.dims, plain_loss))
            loss = mrl["ndcg@10"]["dense"] - mrl["ndcg@10"][f"dense@{min(args.dims)}"]
            summary.append(f"{label}: loses {loss:.3f} at {min(args.dims)} against plain's {plain_loss:.3f}: "
                           f"goal (< half) {'met' if loss < plain_loss / 2 else 'NOT met'}")
    print("\nnDCG@10 on the man-page test split (487 queries, 2,435 pages); 'full' = 384 dimensions, "
          f"loss = full - {min(args.dims)}\n")
    print("\n".join(table))
    print()
    print("\n".join(summary))
    print("\ncommand: .venv/bin/python benchmarks/matryoshka.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
