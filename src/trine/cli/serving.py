"""`trine serve`: the HTTP server (OpenAI, text-embeddings-inference and trine's own routes)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from trine.cli.parser import add_hub_options, options_checked, resolve_model_options

logger = logging.getLogger(__name__)


def _serve(args: argparse.Namespace) -> int:
    from trine.errors import MissingInputError, OptionError

    if args.index is not None and not os.path.isdir(args.index):
        raise MissingInputError(f"{args.index}: --index: no such folder")
    if args.documents is not None:
        if not os.path.isfile(args.documents):
            raise MissingInputError(f"{args.documents}: --documents: no such file")
        if args.index is None:
            raise OptionError("--documents are the texts of --index's documents: give --index too")
    if args.truncate and args.no_truncate:
        raise OptionError("--truncate and --no-truncate contradict each other")
    from trine.data.text import check_template
    resolve_model_options(args, "model", "reranker")  # folders, or Hub ids fetched into the Hugging Face cache
    from trine.modeling.fusion import FusionSettings, read_fusion
    from trine.serving import ServeSettings, create_app, run_server

    with options_checked():
        if args.query_instruction_format is not None:
            check_template(args.query_instruction_format.replace("\\n", "\n"), "--query_instruction_format")
        settings = ServeSettings(
            model_name=args.served_model_name or _model_name(args.model_references["model"]),
            api_key=args.api_key or os.environ.get("TRINE_API_KEY") or None,
            max_batch_texts=args.max_batch_texts, max_batch_tokens=args.max_batch_tokens,
            max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            max_texts_per_request=args.max_texts_per_request, max_body_bytes=args.max_body_bytes,
            max_text_chars=args.max_text_chars, max_colbert_tokens=args.max_colbert_tokens,
            allowed_hosts=_allowed_hosts(args), truncate=not args.no_truncate,
            colbert_rerank_k=args.rerank_k, reranker_top_k=args.reranker_top_k,
            fusion=read_fusion(args.model) or FusionSettings(),
        )
    if settings.api_key is None and args.host not in LOOPBACK:
        logger.warning("trine serve: listening on %s with no API key: anyone who reaches this port can use the "
                       "model (set --api-key or TRINE_API_KEY)", args.host)
    embedder, reranker, index = _load(args)
    documents = None
    if args.documents is not None:
        from trine.serving import load_documents

        with options_checked():
            documents = load_documents(args.documents, index.ids)
    run_server(create_app(embedder, reranker, index, settings, documents), args.host, args.port,
               log_level=args.log_level if args.log_level != "WARNING" else "info")
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--allowed-hosts`` (comma-separated); unset: the loopback names when the server listens on a loopback
    address (a web page's DNS-rebound name is refused), any host otherwise."""
    if args.allowed_hosts is not None:
        return tuple(h.strip() for h in args.allowed_hosts.split(","))
    return LOOPBACK if args.host in LOOPBACK else None


def _model_name(reference: str) -> str:
    """The name /v1/embeddings reports by default: a folder's name, or the Hub id (without its @revision)."""
    if os.path.isdir(reference):
        return os.path.basename(os.path.normpath(reference))
    return reference.partition("@")[0]


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The embedder, the reranker (or None) and the index (or None) the options name."""
    from trine.inference import Reranker
    from trine.inference.shards import load_embedder
    from trine.retrieval import HybridRetriever

    common = {"devices": args.devices, "use_fp16": args.fp16, "use_bf16": args.bf16, "show_progress": False}
    with options_checked():
        options = dict(common, batch_size=args.batch_size, query_max_length=args.query_max_len,
                       passage_max_length=args.passage_max_len,
                       query_instruction_for_retrieval=args.query_instruction_for_retrieval,
                       query_instruction_format=args.query_instruction_format)
        if args.heads == "bm25":
            raise ValueError("--heads bm25 needs texts to fit the lexical head on; use neutral or random here")
        if args.heads != "none":
            options["init_missing_heads"] = args.heads
        # the three outputs of a folder with BGE-M3 heads, the dense one of any other embedder (a plain encoder,
        # a decoder: the sparse and ColBERT routes answer 400), as trine encode and trine index build load it
        embedder = load_embedder(args.model, **options)
        reranker = None
        if args.reranker is not None:
            reranker = Reranker(args.reranker, max_length=args.reranker_max_length, **common)
    index = HybridRetriever.load(args.index) if args.index is not None else None
    return embedder, reranker, index


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="serve a model over HTTP: OpenAI /v1/embeddings, text-embeddings-inference's "
                                      "routes, /encode, /score, /search")
    sv.add_argument("model", help="model folder or Hugging Face Hub id (org/name[@revision]; with BGE-M3 heads for "
                                  "the sparse and ColBERT outputs)")
    sv.add_argument("--reranker", default=None, help="reranker folder or Hub id: enables POST /rerank")
    add_hub_options(sv)
    sv.add_argument("--index", default=None, help="a saved HybridRetriever folder over documents encoded by MODEL: "
                                                  "enables POST /search")
    sv.add_argument("--documents", default=None, help="the index's texts: a BEIR corpus.jsonl (_id, title, text) "
                                                      "holding every id of --index: enables /search with rerank")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health "
                                                    "(also: TRINE_API_KEY)")
    sv.add_argument("--served-model-name", default=None, help="the model name /v1/embeddings and /info report "
                                                              "(default: the folder's name, or the Hub id)")
    sv.add_argument("--max-batch-texts", type=int, default=64,
                    help="the dynamic batcher merges waiting requests into encoder calls of at most this many texts")
    sv.add_argument("--max-batch-tokens", type=int, default=16384,
                    help="... and of at most this many tokens (a longer single request is encoded alone)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="how long the batcher waits for more requests after the first of a batch")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting for the model beyond which a request gets 429 with Retry-After")
    sv.add_argument("--max-texts-per-request", type=int, default=256, help="more texts in one request get 413")
    sv.add_argument("--max-body-bytes", type=int, default=2_000_000,
                    help="a longer request body gets 413, refused before it is read (default 2,000,000)")
    sv.add_argument("--max-text-chars", type=int, default=100_000,
                    help="a text (with its instruction) of more characters gets 413, before it is tokenised")
    sv.add_argument("--max-colbert-tokens", type=int, default=8192,
                    help="a request for ColBERT vectors (one per token) holding more tokens gets 413")
    sv.add_argument("--allowed-hosts", default=None,
                    help="comma-separated names a request's Host header may carry (*.example.com: sub-domains; '*': "
                         "any); default: localhost,127.0.0.1,::1 when --host is a loopback address, else any")
    sv.add_argument("--truncate", action="store_true",
                    help="cut texts longer than the model's maximum length (the default)")
    sv.add_argument("--no-truncate", action="store_true",
                    help="refuse such texts with 413 instead (a request's own truncate field still wins)")
    sv.add_argument("--heads", default="none", choices=["none", "neutral", "random"],
                    help="how to start heads for a folder without head files (none: serve it dense only)")
    sv.add_argument("--query_max_len", type=int, default=None, help="query tokens (default 512 or the model's)")
    sv.add_argument("--passage_max_len", type=int, default=None, help="passage tokens (default 512 or the model's)")
    sv.add_argument("--query_instruction_for_retrieval", default=None,
                    help="prepended to queries (kind=query in /encode, and /search)")
    sv.add_argument("--query_instruction_format", default=None,
                    help="the instruction template, two plain fields: instruction, then text (default: the model "
                         "family's, {}{} for encoders)")
    sv.add_argument("--batch-size", type=int, default=256, help="the encoder's own batch size (token-budgeted)")
    sv.add_argument("--reranker-max-length", type=int, default=None, help="query + passage tokens per pair")
    sv.add_argument("--rerank-k", type=int, default=100,
                    help="dense candidates re-ranked by maxsim in /search mode colbert (colbert_search rerank)")
    sv.add_argument("--reranker-top-k", type=int, default=100,
                    help="candidates the reranker scores in /search with rerank: true (a request's rerank_top_k wins)")
    sv.add_argument("--devices", "--device", default=None, help="cpu, cuda:0, ... (default: one device)")
    sv.add_argument("--fp16", action="store_true")
    sv.add_argument("--bf16", action="store_true")
    sv.set_defaults(func=_serve)
