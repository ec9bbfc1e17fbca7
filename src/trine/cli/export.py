"""`trine export`: a trine model as sentence-transformers v6 folders or one ONNX graph."""

from __future__ import annotations

import argparse

from trine.cli.parser import add_hub_options, resolve_model_options
from trine.errors import OptionError

TARGETS = ("sentence-transformers", "onnx")


def _export(args: argparse.Namespace) -> int:
    from trine.io import check_output_path

    if args.to == "onnx" and args.parts is not None:
        raise OptionError("--parts goes with --to sentence-transformers (the ONNX graph holds every output)")
    if args.to == "sentence-transformers" and (args.quantize is not None or args.opset is not None):
        raise OptionError("--quantize and --opset go with --to onnx")
    resolve_model_options(args, "model")  # a folder, or a Hub id fetched into the Hugging Face cache
    model = args.model
    # before anything is loaded: the export may not replace the model or a folder trine did not write
    check_output_path(args.out, inputs=[model], overwrite=args.overwrite, what="export folder")
    if args.to == "sentence-transformers":
        from trine.export import export_sentence_transformers

        parts = None if args.parts is None else tuple(p.strip() for p in args.parts.split(",") if p.strip())
        for part, folder in export_sentence_transformers(model, args.out, parts=parts,
                                                         overwrite=args.overwrite).items():
            print(f"{part}: {folder}")
        return 0
    from trine.export import export_onnx

    recipe = export_onnx(model, args.out, opset=18 if args.opset is None else args.opset, quantize=args.quantize,
                         overwrite=args.overwrite)
    print(f"onnx: {args.out} (outputs {', '.join(recipe['outputs'])}, opset {recipe['opset']})")
    if "int8_min_cosine" in recipe:
        print(f"int8: {recipe['int8_file']} (min dense cosine to fp32: {recipe['int8_min_cosine']:.4f})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a model as sentence-transformers folders (dense, sparse, "
                                       "multi-vector) or one ONNX graph with every output")
    ex.add_argument("model", help="trine / BGE-M3 model folder or Hugging Face Hub id (org/name[@revision])")
    add_hub_options(ex)
    ex.add_argument("out", help="new export folder")
    ex.add_argument("--to", required=True, choices=TARGETS)
    ex.add_argument("--parts", default=None,
                    help="sentence-transformers: comma-separated of dense, sparse, multivector (default: every "
                         "output the model has; sparse and multivector need the BGE-M3 head files)")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    ex.add_argument("--quantize", default=None, choices=["int8"],
                    help="also write model_int8.onnx (ONNX Runtime dynamic quantisation) and print its measured "
                         "cosine to fp32")
    ex.add_argument("--overwrite", action="store_true", help="replace an export folder trine wrote earlier")
    ex.set_defaults(func=_export)
