"""`trine encode`: a corpus JSONL to dense / lexical / ColBERT encodings on disk, in shards.

One process encodes every shard (or ``--shard-id i`` of ``--num-shards N``); under ``torchrun`` each
rank takes its share; ``--ray`` runs the encoder as Ray Data actors. A re-run skips finished shards
and refuses a folder encoded with another model or other options. The layout and the reader
(:func:`trine.inference.load_encoded`) are described in :mod:`trine.inference.shards`.
"""

from __future__ import annotations

import argparse

from trine.cli.parser import add_hub_options, options_checked, resolve_model_options
from trine.errors import OptionError


def _encode(args: argparse.Namespace) -> int:
    from trine.inference.result import check_outputs
    from trine.inference.shards import dist_world, encode_corpus

    if not args.ray and (args.ray_address is not None or args.ray_actors is not None):
        raise OptionError("--ray-address and --ray-actors go with --ray")
    outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    with options_checked():
        check_outputs(outputs)
    resolve_model_options(args, "model")  # a folder, or a Hub id fetched into the Hugging Face cache
    options = {"batch_size": args.batch_size, "passage_max_length": args.passage_max_len,
               "passage_instruction_for_retrieval": args.passage_instruction_for_retrieval,
               "passage_instruction_format": args.passage_instruction_format, "use_fp16": args.fp16,
               "use_bf16": args.bf16, "truncate_dim": args.truncate_dim, "show_progress": not args.no_progress}
    if args.devices is not None:
        # the parser splits a comma-separated --devices (trine.cli.parser.device_list): a string or a list
        options["devices"] = [args.devices] if isinstance(args.devices, str) else list(args.devices)
    with options_checked():
        summary = encode_corpus(
            args.model, args.corpus, args.output_dir, outputs=outputs, num_shards=args.num_shards,
            shard_ids=None if args.shard_id is None else [args.shard_id], block_size=args.block_size,
            engine="ray" if args.ray else "local", ray_address=args.ray_address, ray_actors=args.ray_actors,
            **options,
        )
    if dist_world()[0] == 0:
        for line in summary.lines():
            print(line)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    en = sub.add_parser("encode", help="encode a corpus JSONL into sharded dense / lexical / ColBERT encodings "
                                       "(resumable; torchrun or --ray for many devices)")
    en.add_argument("model", help="model folder or Hugging Face Hub id (org/name[@revision]; with BGE-M3 head files "
                                  "for the sparse and ColBERT outputs)")
    add_hub_options(en)
    en.add_argument("corpus", help="corpus JSONL: _id (or id), text, optional title (BEIR's corpus.jsonl)")
    en.add_argument("--output-dir", required=True,
                    help="new folder, or one an earlier `trine encode` of the same options left unfinished")
    en.add_argument("--outputs", default="dense", help="comma-separated of dense, sparse, colbert")
    en.add_argument("--num-shards", type=int, default=1, help="shards the corpus is cut into")
    en.add_argument("--shard-id", type=int, default=None,
                    help="encode only this shard (0-based; default: every shard, or under torchrun this rank's)")
    en.add_argument("--block-size", type=int, default=16384,
                    help="texts per encoder call (bounds the memory held before a shard is written)")
    en.add_argument("--batch-size", type=int, default=256, help="the encoder's own batch size (token-budgeted)")
    en.add_argument("--passage_max_len", type=int, default=None, help="passage tokens (default 512 or the model's)")
    en.add_argument("--passage_instruction_for_retrieval", default=None, help="prepended to every passage")
    en.add_argument("--passage_instruction_format", default="{}{}")
    en.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka: keep the first dense dimensions")
    en.add_argument("--devices", "--device", default=None,
                    help="comma-separated: cpu, cuda:0, ... (default: one device; under torchrun the rank's GPU)")
    en.add_argument("--fp16", action="store_true")
    en.add_argument("--bf16", action="store_true")
    en.add_argument("--no-progress", action="store_true", help="no progress bar")
    en.add_argument("--ray", action="store_true", help="encode with Ray Data actors (pip install 'trine[ray]')")
    en.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start a local one)")
    en.add_argument("--ray-actors", type=int, default=None, help="encoder actors (default: one per device)")
    en.set_defaults(func=_encode)
