"""Write real training data for the recipes: man-page (NAME one-liner, DESCRIPTION) pairs.

    .venv/bin/python examples/manpages_pairs.py outputs/manpages

writes a BEIR-layout folder (``outputs/manpages/beir``, whose ``test`` split is held out) and
``outputs/manpages/train_pairs.jsonl`` in FlagEmbedding's format built from the ``train`` split
(no negatives: the stage-2 recipe trains on in-batch negatives; mine hard negatives for stage 3).
"""

from __future__ import annotations

import json
import os
import sys

from trine.evaluation.data import load_dataset
from trine.evaluation.manpages import build_manpages_beir


def main(out: str) -> None:
    beir = build_manpages_beir(os.path.join(out, "beir"), seed=0, test_fraction=0.2)
    train = load_dataset(beir, "train")
    path = os.path.join(out, "train_pairs.jsonl")
    with open(path, "w") as f:
        for qid, docs in train.qrels.items():
            f.write(json.dumps({"query": train.queries[qid], "pos": [train.corpus[d]["text"] for d in docs]}) + "\n")
    print(f"{len(train.qrels)} training pairs in {path}; held-out test set in {beir} (split 'test')")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/manpages")
