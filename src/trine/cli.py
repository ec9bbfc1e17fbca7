"""`trine <command>`."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    from trine.demo import run_demo

    run_demo(args.model, heads=args.heads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trine", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="encode real texts with a real small model and print every score mode")
    demo.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its PyPI package)")
    demo.add_argument("--heads", default="neutral", choices=["neutral", "random"],
                      help="how to start heads for a folder without head files")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
