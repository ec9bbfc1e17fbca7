"""`trine split-by-length`, and the training commands (their flags belong to Hugging Face's parser)."""

from __future__ import annotations

import argparse

from trine.cli.parser import add_hub_options, resolve_model_options


def _split_by_length(args: argparse.Namespace) -> int:
    import json
    import os

    from trine.training.buckets import split_by_length, suggest_batch_size

    resolve_model_options(args, "model_name_or_path")  # a folder, or a Hub id fetched into the Hugging Face cache
    # bad data, model folder or output: a UserError, reported by main() (exit 2)
    report = split_by_length(args.input_path, args.output_dir, args.model_name_or_path, edges=args.length_list,
                             reference_batch=args.reference_batch, reference_length=args.reference_length,
                             overwrite=args.overwrite)
    options = {}
    print(f"{'file':<50} {'records':>8} {'mean tokens':>12}" + (f" {'batch size':>11}" if args.reference_batch else ""))
    for path, buckets in report.items():
        stem = os.path.splitext(os.path.basename(path))[0]
        for b in buckets:
            name = os.path.join(args.output_dir, f"{stem}_{b.name}.jsonl")
            line = f"{name:<50} {b.count:>8} {b.mean_length:>12.1f}"
            if args.reference_batch:
                bs = suggest_batch_size(b.mean_length, args.reference_batch, args.reference_length)
                options[name] = {"batch_size": bs}
                line += f" {bs:>11}"
            print(line)
    if options:
        print("\nfile_options for the training config (with same_dataset_within_batch: true):")
        print(json.dumps(options))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    split = sub.add_parser("split-by-length", help="cut training files into length buckets (per-bucket batch sizes)")
    split.add_argument("--input_path", nargs="+", required=True, help="training JSONL files or folders")
    split.add_argument("--output_dir", required=True)
    split.add_argument("--model_name_or_path", required=True,
                       help="folder or Hugging Face Hub id whose tokenizer measures lengths")
    add_hub_options(split, "--model_name_or_path")
    split.add_argument("--length_list", type=int, nargs="+", default=[0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000],
                       help="bucket edges in tokens (the last bucket is open-ended)")
    split.add_argument("--reference_batch", type=int, default=None,
                       help="a per-device batch size known to fit at --reference_length: suggests one per bucket")
    split.add_argument("--reference_length", type=int, default=512)
    split.add_argument("--overwrite", action="store_true", help="replace an --output_dir trine wrote earlier")
    split.set_defaults(func=_split_by_length)
    sub.add_parser("finetune", add_help=False,
                   help="contrastive fine-tuning (flags: `trine finetune --help`, or one YAML/JSON config file)")
    sub.add_parser("finetune-reranker", add_help=False,
                   help="cross-encoder fine-tuning (flags: `trine finetune-reranker --help`, or a YAML/JSON file)")
    sub.add_parser("pretrain", add_help=False,
                   help="RetroMAE pre-training of an MLM encoder (flags: `trine pretrain --help`, or a YAML/JSON file)")
