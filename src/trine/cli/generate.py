"""`trine generate-queries`: synthetic (query, passage) training pairs written by a language model,
optionally kept only where `trine filter`'s consistency filter keeps them."""

from __future__ import annotations

import argparse

from trine.cli.curation import _Devices, _FlagOrBool, _run_curation, _teacher
from trine.cli.parser import add_hub_options, floats, options_checked, resolve_model_options
from trine.errors import OptionError


def _generate(args: argparse.Namespace) -> int:
    from trine.curation.common import check_output
    from trine.curation.generate import QueryGenerator, generate_queries, load_prompt
    from trine.io import check_distinct

    check_output([args.input_file, args.prompt_file], args.output_file)
    if args.dropped_file is not None:
        check_output([args.input_file, args.prompt_file], args.dropped_file, "dropped_file")
        check_distinct({"output_file": args.output_file, "dropped_file": args.dropped_file})
    load_prompt(args.prompt, args.prompt_file)  # a bad template is refused before any model is loaded
    filtering = args.top_k is not None or args.min_score is not None
    if filtering and not (args.filter_model or args.filter_reranker):
        raise OptionError("--top_k and --min_score need --filter_model (an embedder) or --filter_reranker")
    if not filtering and (args.filter_model or args.filter_reranker or args.dropped_file):
        raise OptionError("--filter_model, --filter_reranker and --dropped_file need --top_k and/or --min_score")
    # after the options' checks, before anything is loaded: folders, or Hub ids fetched into the cache
    resolve_model_options(args, "model", "filter_model", "filter_reranker",
                          extra_files={"model": [args.gguf_file] if args.gguf_file else []})
    scorer = None
    if filtering:  # `trine filter`'s teacher, from the --filter_* options
        scorer = _teacher(argparse.Namespace(
            model_name_or_path=args.filter_model, reranker=args.filter_reranker, model_type=args.filter_model_type,
            score_mode=args.score_mode, weights=args.weights, batch_size=args.filter_batch_size,
            reranker_max_len=args.reranker_max_len, normalize=args.normalize, devices=args.devices,
            use_fp16=args.use_fp16, quiet=args.quiet, query_max_len=args.query_max_len,
            passage_max_len=args.filter_passage_max_len, query_instruction_for_retrieval=args.query_instruction,
            query_instruction_format=args.query_instruction_format))
    with options_checked():
        generator = QueryGenerator(args.model, devices=args.devices, use_fp16=args.use_fp16,
                                   batch_size=args.batch_size, passage_max_len=args.passage_max_len,
                                   gguf_file=args.gguf_file, use_chat_template=args.use_chat_template)
    generator.model_name = args.model_references["model"]  # the records name the model as given: a Hub id as such
    try:
        return _run_curation(args, lambda: generate_queries(
            args.input_file, args.output_file, generator, prompt=args.prompt, prompt_file=args.prompt_file,
            num_queries=args.num_queries, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, seed=args.seed, copy_threshold=args.copy_threshold,
            chunk_size=args.chunk_size, filter_scorer=scorer,
            top_k=args.top_k, min_score=args.min_score, rank_sample_size=args.rank_sample_size,
            dropped_file=args.dropped_file, show_progress=not args.quiet))
    finally:
        generator.close()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate-queries", help="synthetic training pairs: an LM writes queries for passages")
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="a causal LM (its chat template when it has one) or a sequence-to-sequence model folder, "
                        "or a Hugging Face Hub id (org/name[@revision])")
    add_hub_options(p, "--model")
    p.add_argument("--gguf_file", default=None, help="a GGUF file in the model folder (de-quantised on load)")
    p.add_argument("--use_chat_template", action=_FlagOrBool, default=None,
                   help="default: the chat template when the tokenizer has one")
    p.add_argument("--input_file", required=True, help='passages: JSONL of {"text", "_id"?, "title"?}')
    p.add_argument("--output_file", required=True, help="training pairs (never the input file)")
    p.add_argument("--prompt", default=None, help="prompt template with {passage} (and optionally {title})")
    p.add_argument("--prompt_file", default=None, help="a file holding the prompt template")
    p.add_argument("--num_queries", type=int, default=3, help="queries generated per passage (before de-duplication)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy, one query)")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--copy_threshold", type=float, default=0.6,
                   help="drop a query when this share of its word trigrams is in the passage (above 1: exact "
                        "copies only)")
    p.add_argument("--batch_size", type=int, default=8, help="passages per generation batch")
    p.add_argument("--passage_max_len", type=int, default=256, help="tokens of a passage shown in the prompt")
    p.add_argument("--chunk_size", type=int, default=256, help="passages generated and written per step")
    p.add_argument("--devices", action=_Devices, default=None, help="a device, or several (cuda:0 cuda:1)")
    p.add_argument("--use_fp16", action=_FlagOrBool, default=False, help="half precision (--use_fp16 [true|false])")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    f = p  # the consistency filter: trine filter's (the passage must rank in the top-k for its query); one parser,
    # not an argument group, so that every flag takes both spellings
    f.add_argument("--top_k", type=int, default=None, help="drop a pair whose passage ranks below this")
    f.add_argument("--min_score", type=float, default=None, help="drop a pair the reference scores below this")
    f.add_argument("--rank_sample_size", type=int, default=99, help="other passages each rank check compares with")
    f.add_argument("--filter_model", default=None, help="reference embedder folder")
    f.add_argument("--filter_model_type", default="dense", choices=["dense", "m3"])
    f.add_argument("--filter_reranker", default=None, help="reference cross-encoder folder (instead)")
    f.add_argument("--score_mode", default="dense",
                   choices=["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"])
    f.add_argument("--weights", type=floats, default=None, help="dense,sparse,colbert weights of the combined modes")
    f.add_argument("--filter_batch_size", type=int, default=256)
    f.add_argument("--query_max_len", type=int, default=64)
    f.add_argument("--filter_passage_max_len", type=int, default=512)
    f.add_argument("--query_instruction", default=None, help="the reference embedder's query instruction")
    f.add_argument("--query_instruction_format", default="{}{}")
    f.add_argument("--reranker_max_len", type=int, default=None)
    f.add_argument("--normalize", action="store_true", help="cross-encoder scores through a sigmoid")
    f.add_argument("--dropped_file", default=None, help="write the filtered-out pairs with their reason here")
    p.set_defaults(func=_generate)
