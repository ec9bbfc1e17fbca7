"""Why fusion adds little: :func:`trine.evaluation.analysis.analyze_fusion` on a model of the demo.

Evaluates the model's modes on the test split with the fusion settings of its folder (``fusion.json``, as
``trine eval`` reads them), and prints the per-query analysis (shares each head gets right, agreement of the
heads, what fusion wins and loses, oracle fusions) as markdown; ``--out`` writes the JSON::

    PYTHONPATH=src python benchmarks/fusion_analysis.py outputs/demo --model unified --out fusion_analysis.json

``--encodings FILE`` replays the encodings ``benchmarks/eval_speed.py --save-encodings`` kept (no encoder run).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle

from eval_speed import MODES, request_key  # the demo's evaluation settings; its encodings' keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", help="the demo's output folder (beir/ and the model folders)")
    parser.add_argument("--model", default="unified", help="model folder inside the demo folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="a query is right when its nDCG@10 is at least this")
    parser.add_argument("--encodings", default=None,
                        help="replay the encodings of an eval_speed.py --save-encodings file")
    parser.add_argument("--out", default=None, help="JSON file for the analysis")
    args = parser.parse_args()

    from trine import M3Embedder
    from trine.evaluation import EvalConfig, load_dataset
    from trine.evaluation.analysis import analysis_table, analyze_fusion
    from trine.evaluation.runner import resolve_fusion
    from trine.inference.encoder import Encoder

    if args.encodings:
        with open(args.encodings, "rb") as f:
            encodings = pickle.load(f)

        def replay(self, sentences, outputs=("dense",), *, kind=None, max_length=None, **kwargs):
            return encodings[f"{args.model}:" + request_key(sentences, outputs, kind, max_length)]

        Encoder.encode_result = replay
    model_dir = os.path.join(args.demo, args.model)
    dataset = load_dataset(os.path.join(args.demo, "beir"), args.split)
    config = EvalConfig(modes=MODES, k_values=(1, 10, 100), metrics=("ndcg", "mrr", "recall"),
                        query_max_length=32, passage_max_length=256)
    fusion, _ = resolve_fusion(config, model_dir)
    model = M3Embedder(model_dir, show_progress=False)
    analysis = analyze_fusion(model, dataset, config, fusion=fusion, threshold=args.threshold)
    analysis["model"] = model_dir
    print(analysis_table(analysis))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(analysis, f, indent=1)


if __name__ == "__main__":
    main()
