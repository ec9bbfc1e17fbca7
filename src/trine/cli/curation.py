"""`trine mine`, `trine score`, `trine filter`: data curation commands."""

from __future__ import annotations

import argparse

from trine.cli.parser import (
    PLAID_FLAGS,
    add_colbert_index_options,
    add_hub_options,
    floats,
    options_checked,
    resolve_model_options,
)
from trine.cli.parser import DevicesAction as _Devices  # noqa: F401 (generate-queries imports it from here)
from trine.errors import InputError, OptionError, UserError

# FlagEmbedding's scripts/hn_mine.py and scripts/add_reranker_score.py option names: each one trine
# has under another name is an alias of it; the ones trine cannot honour are refused by name.
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _bool_value(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE | _FALSE:
        return low in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _FlagOrBool(argparse.Action):
    """``--use_fp16`` alone, or with a value (``--use_fp16 False``, as FlagEmbedding's parser takes it)."""

    def __init__(self, option_strings, dest, **kwargs):  # noqa: ANN001
        super().__init__(option_strings, dest, nargs="?", const=True, type=_bool_value, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, values)


def _refused(p: argparse.ArgumentParser, name: str, why: str, accept: str | None = None,
             nargs: str = "?") -> None:
    """A FlagEmbedding option trine cannot honour: an error naming it and why (``accept``: the
    one value, compared case-insensitively, that asks for what trine does anyway)."""

    class Refused(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            given = values if isinstance(values, str) else " ".join(map(str, values or [])) or "true"
            if accept is not None and given.strip().lower() == accept:
                return
            raise OptionError(f"{option_string} {given}: {why} (FlagEmbedding's option; trine cannot honour it)")

    p.add_argument(f"--{name}", action=Refused, nargs=nargs, const="true", default=None, dest=f"_refused_{name}",
                   help=argparse.SUPPRESS)


class _ModelClass(argparse.Action):
    """FlagEmbedding's ``--embedder_model_class`` / ``--reranker_model_class``: the encoder-only
    classes map to trine's ``--model_type``; the others are refused."""

    classes: dict[str, str | None] = {}

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        if values not in self.classes:
            raise OptionError(f"{option_string} {values}: trine {parser.prog.split()[-1]} takes "
                              f"{', '.join(self.classes)} (FlagEmbedding's other classes are not supported)")
        if self.classes[values] is not None:
            namespace.model_type = self.classes[values]


class _EmbedderClass(_ModelClass):
    classes = {"encoder-only-base": "dense", "encoder-only-m3": "m3"}


class _RerankerClass(_ModelClass):
    """FlagEmbedding's reranker classes: encoder-only-base leaves the family to the folder (a cross-encoder or an
    LLM reranker folder says which it is); the decoder-only ones name trine's LLM reranker families."""

    classes = {"encoder-only-base": None, "decoder-only-base": "llm-reranker",
               "decoder-only-layerwise": "llm-reranker-layerwise"}

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        if values not in self.classes:
            raise OptionError(f"{option_string} {values}: trine {parser.prog.split()[-1]} takes "
                              f"{', '.join(self.classes)} (FlagEmbedding's other classes are not supported)")
        namespace.reranker_family = self.classes[values]


def _hn_mine_names(p: argparse.ArgumentParser) -> None:
    """FlagEmbedding's hn_mine.py options trine mine has no alias for."""
    p.add_argument("--embedder_model_class", action=_EmbedderClass, default=None, dest="_embedder_model_class",
                   help="FlagEmbedding's name: encoder-only-base (--model_type dense) or encoder-only-m3 (m3)")
    _refused(p, "use_gpu_for_searching", "trine mine searches with FAISS on the CPU (choose --index_kind)", "false")
    _refused(p, "normalize_embeddings", "trine's embedders normalise dense vectors as the model folder says",
             "true")
    _refused(p, "pooling_method", "trine reads the pooling from the model folder (sentence-transformers config, "
             "else cls)")
    _refused(p, "examples_for_task", "in-context examples are for FlagEmbedding's decoder-only ICL embedder")
    _refused(p, "examples_instruction_format", "in-context examples are for FlagEmbedding's decoder-only ICL "
             "embedder")
    _refused(p, "trust_remote_code", "trine curation loads models without remote code", "false")


def _add_reranker_score_names(p: argparse.ArgumentParser) -> None:
    """FlagEmbedding's add_reranker_score.py options trine score has no alias for."""
    p.add_argument("--reranker_model_class", action=_RerankerClass, default=None, dest="_reranker_model_class",
                   help="FlagEmbedding's name: encoder-only-base (the folder says its family), decoder-only-base "
                        "(llm-reranker), decoder-only-layerwise (llm-reranker-layerwise)")
    p.set_defaults(reranker_family=None)
    for name in ("query_instruction_for_rerank", "query_instruction_format_for_rerank",
                 "passage_instruction_for_rerank", "passage_instruction_format_for_rerank"):
        _refused(p, name, "trine score reads pairs as they are (no rerank instructions)")
    _refused(p, "reranker_query_max_length", "trine score cuts pairs at --reranker_max_len only")
    _refused(p, "use_bf16", "trine score runs in float32 or --use_fp16", "false")
    _refused(p, "reranker_peft_path", "trine loads merged model folders (no PEFT adapters)")
    p.add_argument("--prompt", default=None, help="an LLM reranker's prompt (default: the one its folder records, "
                   "else FlagEmbedding's)")
    p.add_argument("--cutoff_layers", type=int, nargs="+", default=None,
                   help="a layer-wise reranker's layer to score at (one: a teacher score is one number per pair; "
                        "default: its last layer)")
    _refused(p, "compress_layers", "compression is for FlagEmbedding's lightweight rerankers", nargs="*")
    _refused(p, "compress_ratio", "compression is for FlagEmbedding's lightweight rerankers", "1")
    _refused(p, "trust_remote_code", "trine curation loads models without remote code", "false")


def _curation_embedder(args: argparse.Namespace, m3: bool):
    """The embedder a curation command names (an M3Embedder when lexical or multi-vector scores are needed)."""
    from trine import Embedder, M3Embedder

    cls = M3Embedder if m3 else Embedder
    with options_checked():  # e.g. --batch_size 0, --passage_max_len beyond the model's positions
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
        layers = getattr(args, "cutoff_layers", None)
        if layers is not None and len(layers) != 1:
            raise OptionError(f"--cutoff_layers {' '.join(map(str, layers))}: a teacher score is one number per pair; "
                              "name one layer")
        extra = {k: v for k, v in (("model_family", getattr(args, "reranker_family", None)),
                                   ("prompt", getattr(args, "prompt", None)), ("cutoff_layers", layers))
                 if v is not None}
        with options_checked():  # e.g. --cutoff_layers for a model without layer heads, --prompt for a cross-encoder
            return load_reranker_scorer(args.reranker, batch_size=args.batch_size, max_length=args.reranker_max_len,
                                        normalize=args.normalize, devices=args.devices, use_fp16=args.use_fp16,
                                        show_progress=not args.quiet, **extra)
    for name, flag in (("cutoff_layers", "--cutoff_layers"), ("prompt", "--prompt"),
                       ("reranker_family", "--reranker_model_class")):
        if getattr(args, name, None) is not None:
            raise OptionError(f"{flag}: an option of a reranker teacher (--reranker), not of an embedder")
    if not args.model_name_or_path:
        raise OptionError("a teacher is needed: --model_name_or_path (an embedder) or --reranker (a cross-encoder)")
    m3 = args.model_type == "m3" or args.score_mode != "dense"
    return EmbedderScorer(_curation_embedder(args, m3), args.score_mode, args.weights)


def _run_curation(args: argparse.Namespace, work) -> int:
    # main() reports a user's mistake (exit 2; the traceback under --log-level DEBUG): nothing was written
    try:
        with options_checked():  # bad options the library names
            summary = work()
    except FileNotFoundError as err:
        if isinstance(err, UserError):
            raise
        raise InputError(str(err)) from err
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
    plaid = {k: getattr(args, k) for k in PLAID_FLAGS if k != "nprobe" and getattr(args, k) is not None}
    if plaid and args.colbert_index != "plaid":
        raise OptionError(f"--{' --'.join(plaid)}: options of --colbert_index plaid")
    if args.colbert_index is not None:
        clash = [flag for flag, bad in (("--hybrid_weights", hybrid), ("--backend", args.backend != "trine"),
                                        ("--index_kind", args.index_kind != "flat"),
                                        ("--hnsw_m", args.hnsw_m is not None),
                                        ("--ef_search", args.ef_search is not None),
                                        ("--nlist", args.nlist is not None)) if bad]
        if clash:
            raise OptionError(f"--colbert_index {args.colbert_index} ranks by ColBERT maxsim with trine's multi-vector "
                              f"index: not with {', '.join(clash)}")
        if args.nprobe is not None:
            if args.colbert_index != "plaid":
                raise OptionError("--nprobe goes with --index_kind ivf or --colbert_index plaid")
            plaid["nprobe"] = args.nprobe
    # after the options' checks, before anything is loaded: a folder, or a Hub id fetched into the cache
    resolve_model_options(args, "model_name_or_path")
    embedder = _curation_embedder(args, m3=hybrid or args.model_type == "m3" or args.colbert_index is not None)
    options = {} if args.colbert_index is not None else \
        {k: getattr(args, k) for k in ("hnsw_m", "ef_search", "nlist", "nprobe") if getattr(args, k) is not None}
    return _run_curation(args, lambda: mine_hard_negatives(
        args.input_file, args.output_file, embedder, candidate_pool=args.candidate_pool,
        range_for_sampling=parse_range(args.range_for_sampling), negative_number=args.negative_number,
        relative_margin=args.relative_margin, backfill=args.backfill, seed=args.seed,
        hybrid_weights=args.hybrid_weights, hybrid_candidates=args.hybrid_candidates,
        hybrid_normalization=args.hybrid_normalization, index_kind=args.index_kind,
        index_options=options, cache_dir=args.cache_dir, query_chunk_size=args.query_chunk_size,
        search_batch_size=args.search_batch_size, show_progress=not args.quiet,
        backend=args.backend, backend_uri=args.uri, collection=args.collection,
        colbert_index=args.colbert_index, colbert_options=plaid,
    ))


def _score(args: argparse.Namespace) -> int:
    from trine.curation.teacher import add_teacher_scores

    _check_outputs(args, [args.input_file])
    resolve_model_options(args, "model_name_or_path", "reranker")  # folders, or Hub ids fetched into the cache
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
    resolve_model_options(args, "model_name_or_path", "reranker")  # folders, or Hub ids fetched into the cache
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


def _curation_model_args(p: argparse.ArgumentParser, required: bool = True,
                         aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """The shared options; ``aliases``: more names of an option (FlagEmbedding's scripts')."""
    more = aliases or {}

    def names(flag: str) -> tuple[str, ...]:
        return (flag, *more.get(flag, ()))

    p.add_argument("--input_file", required=True)
    p.add_argument("--output_file", required=True, help="never the input file")
    p.add_argument(*names("--model_name_or_path"), required=required, default=None,
                   help="any trine model folder, or a Hugging Face Hub id (org/name[@revision])")
    # trine mine's --cache_dir is its encodings cache: there the Hub cache is --hub-cache-dir only
    add_hub_options(p, "--model_name_or_path", cache_dir_flag=p.prog.split()[-1] != "mine")
    p.add_argument("--model_type", default="dense", choices=["dense", "m3"],
                   help="m3: load BGE-M3 heads (needed for sparse / colbert scores; implied by them)")
    p.add_argument("--query_instruction_for_retrieval", default=None)
    p.add_argument(*names("--query_instruction_format"), default="{}{}")
    p.add_argument(*names("--query_max_len"), type=int, default=64)
    p.add_argument(*names("--passage_max_len"), type=int, default=512)
    p.add_argument(*names("--batch_size"), type=int, default=256)
    p.add_argument("--devices", action=_Devices, default=None, help="a device, or several (cuda:0 cuda:1)")
    p.add_argument("--use_fp16", action=_FlagOrBool, default=False, help="half precision (--use_fp16 [true|false])")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _teacher_args(p: argparse.ArgumentParser, flagembedding_names: bool = False) -> None:
    p.add_argument("--score_mode", default="dense",
                   choices=["dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"],
                   help="embedder teacher: which score (modes other than dense need an M3 model)")
    p.add_argument("--weights", type=floats, default=None,
                   help="dense,sparse,colbert weights of the combined modes (default 1,1,1)")
    reranker = ("--reranker", "--reranker_name_or_path") if flagembedding_names else ("--reranker",)
    max_len = ("--reranker_max_len", "--reranker_max_length") if flagembedding_names else ("--reranker_max_len",)
    p.add_argument(*reranker, default=None, help="cross-encoder folder: score pairs with it instead")
    p.add_argument(*max_len, type=int, default=None, help="cross-encoder pair length (default 512)")
    p.add_argument("--normalize", action="store_true", help="cross-encoder scores through a sigmoid")
    p.add_argument("--chunk_size", type=int, default=1024, help="records scored per step")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    mine = sub.add_parser("mine", help="hard negatives for a training file (dense, hybrid or ColBERT ranking)")
    _curation_model_args(mine, aliases={
        "--model_name_or_path": ("--embedder_name_or_path",),
        "--query_instruction_format": ("--query_instruction_format_for_retrieval",),
        "--query_max_len": ("--embedder_query_max_length",),
        "--passage_max_len": ("--embedder_passage_max_length",),
    })
    _hn_mine_names(mine)
    mine.add_argument("--candidate_pool", default=None, help='JSONL of {"text"} (default: the file\'s passages)')
    mine.add_argument("--range_for_sampling", default="2-100", help="ranks to sample from, 0-based, end exclusive")
    mine.add_argument("--negative_number", type=int, default=15)
    mine.add_argument("--relative_margin", type=float, default=None,
                      help="drop candidates scoring above (1 - margin) x the lowest positive score")
    mine.add_argument("--backfill", default="random", choices=["random", "none", "error"],
                      help="when too few candidates remain")
    mine.add_argument("--hybrid_weights", type=floats, default=None,
                      help="dense,sparse: rank by w_d x dense + w_s x lexical (an M3 model; e.g. 1,0.3)")
    mine.add_argument("--hybrid_candidates", type=int, default=None,
                      help="depth of the dense and the sparse first-stage lists re-scored exactly (default: range end)")
    mine.add_argument("--hybrid_normalization", default="none", choices=["none", "minmax", "zscore"],
                      help="per query, put the dense and the lexical scores of the candidate union on one scale "
                           "before weighting (none: raw sums, FlagEmbedding's)")
    mine.add_argument("--backend", default="trine", choices=["trine", "milvus", "qdrant"],
                      help="index the pool in trine's indexes, or in a Milvus / Qdrant collection")
    mine.add_argument("--uri", default=None, help="--backend milvus: a .db file (Milvus Lite) or server URL; qdrant: "
                      "a folder (local mode), :memory: or server URL (default: a file or folder in trine's "
                      "cache, ~/.cache/trine/vectordb/<collection>/)")
    mine.add_argument("--collection", default=None,
                      help="collection name (default: trine_pool_<hash of the pool>)")
    mine.add_argument("--index_kind", default="flat", choices=["flat", "hnsw", "ivf"],
                      help="flat: exact inner product; hnsw / ivf: approximate, for large pools")
    mine.add_argument("--hnsw_m", type=int, default=None)
    mine.add_argument("--ef_search", type=int, default=None)
    mine.add_argument("--nlist", type=int, default=None)
    mine.add_argument("--nprobe", type=int, default=None,
                      help="centroids probed: per query (--index_kind ivf) or per query token (--colbert_index plaid)")
    add_colbert_index_options(mine, None, nprobe=False, help="rank by ColBERT maxsim instead (an M3 model): exact "
                              "scans every pool passage; plaid searches the compressed index (its own candidates), "
                              "for large pools")
    mine.add_argument("--cache_dir", default=None, help="keep the pool's encodings here and reuse them")
    mine.add_argument("--query_chunk_size", type=int, default=2048, help="queries encoded per step")
    mine.add_argument("--search_batch_size", type=int, default=256, help="queries searched per step")
    mine.add_argument("--seed", type=int, default=42)
    mine.set_defaults(func=_mine)
    score = sub.add_parser("score", help="add teacher pos_scores / neg_scores (embedder or cross-encoder)")
    _curation_model_args(score, required=False, aliases={"--batch_size": ("--reranker_batch_size",)})
    _teacher_args(score, flagembedding_names=True)
    _add_reranker_score_names(score)
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
