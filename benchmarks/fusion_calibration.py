"""Calibrated fusion against the plain tuned grid, on the test split, both chosen on the dev split.

For one trained model and its BEIR folder (test and dev splits): the fused modes tuned on dev twice, with the
grid of weights and normalizations alone (``tune_fusion(..., calibrate=False)``, what ``--tune-weights`` did
before) and as ``trine eval --tune-weights --dev-split dev`` does now (the grid, then calibrated fusion kept per
mode where it wins on dev: ``run_evaluation(..., tune_on=dev)``); then every mode of the demo evaluated on the test
queries with each, and with the fitted coefficients applied to every mode whatever their dev gain (what
calibrated fusion does on test where the dev rule does not keep it). The model folder is copied into
``--scratch`` first (tuning writes fusion.json into it), so the original is never written::

    PYTHONPATH=src python benchmarks/fusion_calibration.py outputs/demo/beir outputs/demo/unified \\
        --scratch scratch/demo --save-encodings scratch/demo-enc.pkl --out demo_calibration.json

``--encodings FILE`` replays the encodings of an earlier ``--save-encodings`` (or ``benchmarks/eval_speed.py``
run with the same model folder name) instead of encoding: the corpus encoding is most of the time on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_speed import MODES, add_replay_options, save_replay, start_replay  # noqa: E402  (modes; encoding replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beir", help="BEIR folder with test and dev qrels")
    parser.add_argument("model", help="the trained model folder (never written: it is copied into --scratch)")
    parser.add_argument("--scratch", required=True, help="folder to copy the model into and tune there")
    parser.add_argument("--out", required=True, help="JSON file for both settings and every mode's test metrics")
    add_replay_options(parser)
    args = parser.parse_args()
    name = os.path.basename(os.path.normpath(args.model))
    encodings, saved = start_replay(args, {"current": name})

    from trine.evaluation import EvalConfig, load_dataset, run_evaluation
    from trine.evaluation.runner import evaluate_model, index_corpus, load_embedder, resolve_fusion
    from trine.evaluation.tuning import tune_fusion
    from trine.modeling.fusion import FusionSettings, write_fusion

    work = os.path.join(args.scratch, name)
    if os.path.abspath(work) == os.path.abspath(args.model):
        raise SystemExit("--scratch must not hold the model folder itself: tuning would write into it")
    if os.path.exists(work):
        shutil.rmtree(work)
    shutil.copytree(args.model, work)
    test, dev = load_dataset(args.beir, "test"), load_dataset(args.beir, "dev")
    config = EvalConfig(modes=MODES, k_values=(1, 10, 100), metrics=("ndcg", "mrr", "recall"),
                        query_max_length=32, passage_max_length=256)
    load_before = os.getloadavg()
    start = time.perf_counter()
    model = load_embedder(work, config, None, test.passages()[1])
    corpus = index_corpus(model, test, config)
    plain = tune_fusion(model, dev, config, corpus=corpus, calibrate=False)
    write_fusion(work, plain)
    old = evaluate_model(model, test, config, corpus=corpus, fusion=resolve_fusion(config, work)[0])
    new = run_evaluation([work], test, config, tune_on=dev)  # the door: --tune-weights --dev-split dev
    (entry,) = new["models"].values()
    fitted = {m: r["confidence"] for m, r in entry["tuning"]["tuned_on"]["calibration"].items() if "confidence" in r}
    every = evaluate_model(model, test, config, corpus=corpus,
                           fusion=FusionSettings(plain.normalization, plain.weights, None, fitted))
    report = {
        "beir": args.beir, "model": args.model, "test_queries": len(test.queries), "dev_queries": len(dev.queries),
        "seconds": round(time.perf_counter() - start, 1), "load_before": load_before, "load_after": os.getloadavg(),
        "replayed_encodings": bool(encodings),
        "ndcg@10": {mode: {"grid": old["metrics"][mode]["ndcg@10"], "calibrated": entry["metrics"][mode]["ndcg@10"],
                           "calibrated_every_mode": every["metrics"][mode]["ndcg@10"]} for mode in MODES},
        "grid_settings": plain.to_dict(), "calibrated_settings": entry["tuning"],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    save_replay(args, saved)
    print("| mode | grid (before) | --tune-weights now | coefficients on every mode |\n|---|---|---|---|")
    for mode, values in report["ndcg@10"].items():
        print(f"| {mode} | {values['grid']:.4f} | {values['calibrated']:.4f} | {values['calibrated_every_mode']:.4f} |")
    for mode, record in entry["tuning"]["tuned_on"]["calibration"].items():
        fitted = record.get("dev_calibrated", float("nan"))
        print(f"{mode}: dev grid {record['dev_plain']:.4f}, calibrated {fitted:.4f}, "
              f"confidence {record.get('confidence')}, kept {record['kept']}")


if __name__ == "__main__":
    main()
