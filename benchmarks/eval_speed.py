"""The demo's evaluation phase, timed by phase: ``run_evaluation(models, test, config, tune_on=dev)`` as
``trine demo`` runs it (the same modes, cut-offs, lengths and tuning).

Run it in the same process layout against two source trees to compare them side by side (the phases are
timed by wrapping functions both trees have: ``Encoder.encode_result``, the indexes' ``search`` and ``score``,
``evaluate_run``, ``tune_fusion``)::

    PYTHONPATH=src python benchmarks/eval_speed.py outputs/demo --out new.json
    PYTHONPATH=/path/to/old/src python benchmarks/eval_speed.py outputs/demo --out old.json

``--save-encodings FILE`` keeps every encoding the run made (pickle); ``--encodings FILE`` replays them instead
of encoding (the model code is not run: on a shared machine the encoder's time, the same in both trees, then
stops drowning the phases that differ). Replaying checks each request's texts, outputs and lengths.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pickle
import sys
import time
from collections import defaultdict

MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense", "bm25", "dense+bm25")
SECONDS: dict[str, float] = defaultdict(float)
_STACK: list[str] = []


def timed(phase: str, fn):
    """``fn`` whose own time (not that of timed calls inside it) adds to ``SECONDS[phase]``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        _STACK.append(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            _STACK.pop()
            spent = time.perf_counter() - start
            SECONDS[phase] += spent
            if _STACK:  # the caller's phase does not count it twice
                SECONDS[_STACK[-1]] -= spent
    return wrapper


def request_key(texts, outputs, kind, max_length) -> str:
    return hashlib.sha1(json.dumps([list(texts), sorted(outputs), kind, max_length]).encode()).hexdigest()


def instrument(encodings: dict | None, saved: dict | None, model_of: dict) -> None:
    from trine.evaluation import metrics, runner, tuning
    from trine.inference.encoder import Encoder
    from trine.retrieval import BM25Index, DenseIndex, HybridRetriever, MultiVectorIndex, SparseIndex

    encode = Encoder.encode_result

    def encode_result(self, sentences, outputs=("dense",), *, kind=None, max_length=None, **kwargs):
        key = f"{model_of.get('current')}:" + request_key(sentences, outputs, kind, max_length)
        if encodings is not None:
            if key not in encodings:
                raise SystemExit(f"--encodings has no encoding of this request ({kind}, {len(sentences)} texts)")
            return encodings[key]
        out = encode(self, sentences, outputs, kind=kind, max_length=max_length, **kwargs)
        if saved is not None:
            saved[key] = out
        return out

    Encoder.encode_result = lambda self, *a, **k: timed(
        f"encode {k.get('kind') or 'texts'}", encode_result)(self, *a, **k)
    for cls in (DenseIndex, SparseIndex, MultiVectorIndex, BM25Index):
        name = cls.__name__.removesuffix("Index").lower()
        cls.search = timed(f"first stage {name}", cls.search)
        cls.score = timed(f"score {name}", cls.score)
    HybridRetriever.from_encoded = classmethod(timed("index", HybridRetriever.from_encoded.__func__))
    BM25Index.build = classmethod(timed("index", BM25Index.build.__func__))
    timed_eval = timed("pytrec_eval", metrics.evaluate_run)
    for module in (metrics, runner, tuning):
        if hasattr(module, "evaluate_run"):
            module.evaluate_run = timed_eval
    runner_tune = timed("tuning (rest: grid search, fusion)", tuning.tune_fusion)
    tuning.tune_fusion = runner_tune
    if hasattr(runner, "tune_fusion"):
        runner.tune_fusion = runner_tune


def add_replay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encodings", default=None, help="replay the encodings of this --save-encodings file")
    parser.add_argument("--save-encodings", default=None, help="write every encoding made to this file (pickle)")


def start_replay(args: argparse.Namespace, model_of: dict) -> tuple[dict | None, dict | None]:
    """(the replayed encodings or None, the dict collecting new ones or None), with the functions instrumented."""
    encodings = None
    if args.encodings:
        with open(args.encodings, "rb") as f:
            encodings = pickle.load(f)
    saved: dict | None = {} if args.save_encodings else None
    instrument(encodings, saved, model_of)
    return encodings, saved


def save_replay(args: argparse.Namespace, saved: dict | None) -> None:
    if saved is not None:
        with open(args.save_encodings, "wb") as f:
            pickle.dump(saved, f, protocol=pickle.HIGHEST_PROTOCOL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", help="the demo's output folder (beir/ and the model folders)")
    parser.add_argument("--models", default="zero-shot-neutral,zero-shot,unified")
    parser.add_argument("--out", required=True, help="JSON file for the timings and metrics")
    add_replay_options(parser)
    args = parser.parse_args()
    model_of: dict = {}
    encodings, saved = start_replay(args, model_of)

    import trine
    from trine.evaluation import EvalConfig, load_dataset, run_evaluation

    beir = os.path.join(args.demo, "beir")
    test, dev = load_dataset(beir, "test"), load_dataset(beir, "dev")
    config = EvalConfig(modes=MODES, k_values=(1, 10, 100), metrics=("ndcg", "mrr", "recall"),
                        query_max_length=32, passage_max_length=256)
    load_before = os.getloadavg()
    total = 0.0
    cpu_start = time.process_time()
    result = {"models": {}}
    for name in args.models.split(","):
        model_of["current"] = name
        start = time.perf_counter()
        one = run_evaluation([os.path.join(args.demo, name)], test, config, tune_on=dev)
        total += time.perf_counter() - start
        result["models"].update(one["models"])
    phases = dict(SECONDS)
    phases["other"] = total - sum(phases.values())
    report = {"trine": os.path.dirname(trine.__file__), "total_s": round(total, 2),
              "cpu_s": round(time.process_time() - cpu_start, 2), "load_before": load_before,
              "load_after": os.getloadavg(), "replayed_encodings": bool(encodings),
              "phases_s": {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda x: -x[1])},
              "metrics": {k: v["metrics"] for k, v in result["models"].items()},
              "fusion": {k: v.get("fusion") for k, v in result["models"].items()}}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    save_replay(args, saved)
    shown = ("trine", "total_s", "cpu_s", "load_before", "load_after", "phases_s")
    json.dump({k: report[k] for k in shown}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
