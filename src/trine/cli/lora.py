"""`trine merge-lora`: an adapter folder (a LoRA training run's output) merged into its base model."""

from __future__ import annotations

import argparse

from trine.cli.parser import add_hub_options, resolve_model_options


def _merge_lora(args: argparse.Namespace) -> int:
    from trine.io import check_output_path
    from trine.modeling.lora import adapter_config, base_model_path, merge_lora_folder

    resolve_model_options(args, "adapter_dir", "base")  # folders, or Hub ids fetched into the Hugging Face cache
    adapter = args.adapter_dir
    adapter_config(adapter)  # a LoRA adapter folder, before anything is loaded
    base = base_model_path(adapter, args.base, cache_dir=args.hub_cache_dir)  # the recorded base may be a Hub id
    # before anything is loaded: the merged model may not replace an input or a folder trine did not write
    check_output_path(args.out, inputs=[adapter, base], overwrite=args.overwrite, what="merged model folder")
    merge_lora_folder(adapter, args.out, base=base, overwrite=args.overwrite)
    print(f"merged: {args.out} (base {base} + adapter {adapter})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter folder into its base model (a plain model folder)")
    p.add_argument("adapter_dir", help="adapter folder (use_lora training output or checkpoint) or Hub id")
    p.add_argument("out", help="new folder for the merged model")
    p.add_argument("--base", default=None,
                   help="base model folder (default: base_model_name_or_path of the adapter's adapter_config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder trine wrote earlier")
    add_hub_options(p, "ADAPTER_DIR")
    p.set_defaults(func=_merge_lora)
