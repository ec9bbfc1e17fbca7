"""`trine index build | search | delete`: a corpus encoded into trine's indexes or a vector database
(Milvus, Qdrant), searched by the same modes ``trine eval`` reports.

``build`` into a database is resumable: passages are encoded and written ``--chunk-size`` at a time, and a
build run again (after a kill, or with more passages) encodes only the ids the collection lacks
(``--update``: every passage again, replacing by id); re-running never duplicates a passage. Into
``--backend trine`` the indexes are written once, as a new folder (``HybridRetriever.save``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from trine.cli.parser import (
    add_colbert_index_options,
    add_hub_options,
    colbert_index_options,
    floats,
    options_checked,
    resolve_model_options,
)
from trine.errors import OptionError, UserError
from trine.modes import FUSED_MODES, mode_outputs

SEARCH_MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
DEFAULT_PASSAGE_MAX_LEN = 512


def _encoder(args: argparse.Namespace) -> Any:
    """``trine encode``'s encoder for ``--model``: the three outputs of a folder with BGE-M3 heads (or with
    ``--heads``), the dense one of any other embedder."""
    from trine.inference.shards import load_embedder

    options: dict[str, Any] = {
        "devices": args.devices, "batch_size": args.batch_size, "query_max_length": args.query_max_len,
        "passage_max_length": DEFAULT_PASSAGE_MAX_LEN if args.passage_max_len is None else args.passage_max_len,
        "show_progress": not args.quiet}
    if args.heads != "none":
        options["init_missing_heads"] = args.heads
    with options_checked():
        return load_embedder(args.model, **options)


def _encoded(args: argparse.Namespace, ids: list[str]) -> tuple[Any, Any, tuple[str, ...]]:
    """``--embeddings``: (the checked ``trine encode`` folder, the model's encoder, the outputs to index), or a
    clear error before anything is written: unfinished shards, an output the folder lacks, another model
    (weights, tokenizer, pooling, normalisation) than ``--model``, another corpus file than the one encoded.
    The passages' own options (maximum length, dtype, instruction) are the ones they were encoded with; a
    ``--passage_max_len`` that differs from them is refused."""
    from trine.errors import InputError
    from trine.inference.shards import MANIFEST, load_embedder, open_encoded, read_manifest

    encoded_len = read_manifest(args.embeddings)["identity"]["settings"].get("max_length")
    if not isinstance(encoded_len, int):
        raise InputError(f"{os.path.join(args.embeddings, MANIFEST)}: identity.settings.max_length: missing or "
                         "not an integer (not written by trine encode)")
    if args.passage_max_len is not None and args.passage_max_len != encoded_len:
        raise OptionError(f"--passage_max_len {args.passage_max_len}: {args.embeddings} was encoded with passages "
                          f"of up to {encoded_len} tokens; leave --passage_max_len out (it is not re-encoded), or "
                          "encode again")
    options = {"devices": args.devices, "batch_size": args.batch_size, "query_max_length": args.query_max_len,
               "passage_max_length": encoded_len, "show_progress": not args.quiet}
    if args.heads != "none":
        options["init_missing_heads"] = args.heads
    with options_checked():
        encoder = load_embedder(args.model, **options)  # as trine encode loads it: dense-only without head files
    outputs = tuple(args.outputs.split(",")) if args.outputs else None
    if outputs is not None:
        _outputs(args, encoder)
    enc = open_encoded(args.embeddings, outputs, embedder=encoder, match="model", corpus_file=args.corpus)
    if outputs is None:
        bad = [o for o in enc.outputs if o not in encoder.outputs]
        if bad:
            raise OptionError(f"{args.embeddings} holds {', '.join(bad)}, which {args.model} does not give for "
                              "queries; choose --outputs")
    if enc.count != len(ids):
        raise InputError(f"{args.embeddings}: {enc.count} passages encoded, {args.corpus} has {len(ids)}")
    return enc, encoder, enc.outputs


def _shard_rows(enc: Any, ids: list[str]) -> Any:
    """The shards of ``enc`` one at a time, each checked to carry the corpus's ids at its place."""
    from trine.errors import InputError

    start = 0
    for (path, _, _), (shard_ids, part) in zip(enc.shards, enc):
        if shard_ids != ids[start:start + len(shard_ids)]:
            bad = next(i for i, (a, b) in enumerate(zip(shard_ids, ids[start:])) if a != b)
            raise InputError(f"{path}/ids.json: document {start + bad} is {shard_ids[bad]!r} in the encodings "
                             f"but {ids[start + bad]!r} in the corpus")
        yield start, shard_ids, part
        start += len(shard_ids)


def _outputs(args: argparse.Namespace, encoder: Any) -> tuple[str, ...]:
    outputs = tuple(args.outputs.split(",")) if args.outputs else encoder.outputs
    if not outputs or [o for o in outputs if o not in ("dense", "sparse", "colbert")]:
        raise OptionError(f"--outputs {args.outputs}: choose from {', '.join(encoder.outputs)} (what this model gives)")
    encoder.check_outputs(outputs, f"--outputs {args.outputs}")  # else: an error naming the family, what it gives
    return outputs


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    from trine.retrieval.vectordb import connection_of

    return connection_of(args.backend, args.uri)


def _build(args: argparse.Namespace) -> int:
    from trine.retrieval.vectordb import ModelSignature, collection_class

    if args.chunk_size < 1 or args.upsert_batch < 1:
        raise OptionError("--chunk-size and --upsert-batch must be positive")
    resolve_model_options(args, "model")  # a folder, or a Hub id fetched into the Hugging Face cache
    if args.backend != "trine" and (args.colbert_index != "exact" or colbert_index_options(args)):
        raise OptionError(f"--colbert-index {args.colbert_index}: trine's multi-vector index (--backend trine); "
                          f"{args.backend} keeps its own")
    from trine.data.corpus import corpus_passages, read_corpus

    ids, texts = corpus_passages(read_corpus(args.corpus))
    enc = None
    if args.backend == "trine":
        from trine.io import check_output_path
        from trine.retrieval import HybridRetriever

        if not args.uri:
            raise OptionError("--backend trine writes its indexes to a new folder: give it as --uri")
        inputs = [args.corpus, args.model, *([args.embeddings] if args.embeddings else [])]
        check_output_path(args.uri, inputs=inputs, overwrite=args.overwrite, what="--uri folder")
        plaid = colbert_index_options(args)
        if plaid:
            from trine.retrieval.plaid import check_options

            try:
                check_options(dict(plaid))
            except ValueError as err:
                raise OptionError(f"--colbert-index plaid: {err}") from None
        colbert_index = None
        if args.embeddings:
            import numpy as np

            enc, _, outputs = _encoded(args, ids)
            _check_plaid_outputs(args, outputs)
            if args.colbert_index == "plaid":
                colbert_index = _plaid_from_shards(args, enc, ids, plaid)
            kept = tuple(o for o in outputs if colbert_index is None or o != "colbert")
            parts = [_take(part, list(range(len(shard_ids))), kept) for _, shard_ids, part in _shard_rows(enc, ids)]
            docs = {key: np.concatenate([p[key] for p in parts]) if key == "dense_vecs" else
                    [x for p in parts for x in p[key]] for key in parts[0]}
        else:
            encoder = _encoder(args)
            outputs = _outputs(args, encoder)
            _check_plaid_outputs(args, outputs)
            docs = encoder.encode_result(texts, outputs, kind="passage")
        with options_checked():
            retriever = HybridRetriever.from_encoded(
                {k: v for k, v in dict(docs).items() if v is not None}, ids, dense_kind=args.dense_index,
                colbert_kind=args.colbert_index, colbert_options=plaid if colbert_index is None else None,
                colbert_index=colbert_index)
        retriever.save(args.uri, overwrite=args.overwrite)
        if colbert_index is not None:
            from trine.retrieval.plaid import remove_work_dir

            remove_work_dir(_plaid_work_dir(args.uri))
        print(f"indexed {len(ids)} passages ({', '.join(outputs)}) into {args.uri}"
              + (f" from the encodings in {args.embeddings}" if enc is not None else "")
              + (f"; colbert as a plaid index, {colbert_index.bytes_per_token:.0f} bytes per token"
                 + (f" (pool factor {colbert_index.options['pool_factor']}: per pooled token)"
                    if colbert_index.options["pool_factor"] > 1 else "") if colbert_index is not None else ""))
        return 0
    if args.embeddings:
        enc, encoder, outputs = _encoded(args, ids)
    else:
        encoder = _encoder(args)
        outputs = _outputs(args, encoder)
    signature = ModelSignature.of_encoder(encoder, outputs)
    new_files = _new_files_watch(args)
    collection = None
    try:
        collection = collection_class(args.backend).create(
            args.collection, representations=outputs, signature=signature, exist_ok=True,
            dense_index=args.dense_index, store_text=not args.no_text, **_connection(args))
        fresh = len(collection) == 0
        _fill(args, collection, enc, encoder, ids, texts, outputs)
    except UserError:
        # a refusal while building (a non-finite vector): the database this run made is removed, and a
        # collection it made is dropped; a kill leaves them for the next run to resume
        if collection is not None and fresh and not new_files():
            collection.drop()
        if collection is not None:
            collection.close()
        for path in new_files():
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        raise
    print(f"{args.backend} collection {args.collection!r} holds {len(collection)} passages ({', '.join(outputs)})")
    collection.close()
    return 0


def _check_plaid_outputs(args: argparse.Namespace, outputs: tuple[str, ...]) -> None:
    if args.colbert_index == "plaid" and "colbert" not in outputs:
        raise OptionError("--colbert-index plaid compresses the colbert output, which this build does not index "
                          f"({', '.join(outputs)})")


def _plaid_work_dir(uri: str) -> str:
    """Where a plaid build from shards keeps its finished steps until the index is saved: beside ``--uri``."""
    path = os.path.abspath(uri)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.plaid-build")


def _plaid_from_shards(args: argparse.Namespace, enc: Any, ids: list[str], options: dict[str, int]) -> Any:
    """The colbert output of ``trine encode``'s shards as a plaid index, one shard at a time, resumable: a run
    killed while building keeps the trained codec and the compressed shards in a work folder beside ``--uri``
    and the next run with the same options goes on from there."""
    from trine.errors import InputError
    from trine.inference.shards import read_shard
    from trine.retrieval.plaid import build_plaid

    def part(path: str, start: int, end: int):
        def read() -> tuple[list[str], list[Any]]:
            shard_ids, result = read_shard(path, end - start, ("colbert",))
            if shard_ids != ids[start:end]:
                bad = next(i for i, (a, b) in enumerate(zip(shard_ids, ids[start:end])) if a != b)
                raise InputError(f"{path}/ids.json: document {start + bad} is {shard_ids[bad]!r} in the encodings "
                                 f"but {ids[start + bad]!r} in the corpus")
            return shard_ids, result.colbert_vecs
        return read

    parts = [part(path, start, end) for path, start, end in enc.shards]
    work = _plaid_work_dir(args.uri)
    resumed = os.path.isdir(work)
    if resumed:
        print(f"resuming the plaid build kept in {work}", file=sys.stderr)
    try:
        with options_checked():
            return build_plaid(parts, work, **options)
    except ValueError as err:
        if "unfinished plaid build" in str(err):
            raise InputError(str(err)) from None
        raise


def _new_files_watch(args: argparse.Namespace) -> Callable[[], list[str]]:
    """For an embedded database (a Milvus Lite file, a Qdrant local folder): a function listing the files of it
    (the database and its lock files) that did not exist when this was called; for a server, none."""
    from trine.retrieval.milvus import DEFAULT_URI
    from trine.retrieval.qdrant import DEFAULT_PATH

    uri = args.uri or (DEFAULT_URI if args.backend == "milvus" else DEFAULT_PATH)
    if uri.startswith(("http://", "https://")) or uri == ":memory:":
        return list
    path = os.path.abspath(uri)
    parent, name = os.path.dirname(path), os.path.basename(path)

    def related() -> set[str]:
        if not os.path.isdir(parent):
            return set()
        return {os.path.join(parent, n) for n in os.listdir(parent) if n == name or n.startswith(f".{name}.")}

    before = related()
    return lambda: sorted(related() - before)


def _fill(args: argparse.Namespace, collection: Any, enc: Any, encoder: Any, ids: list[str], texts: list[str],
          outputs: tuple[str, ...]) -> None:
    """Write the passages ``collection`` lacks (every one with ``--update``), encoded or from ``enc``."""
    todo = [i for i, d in enumerate(ids) if args.update or d not in collection]
    verb = "to write from the encodings" if enc is not None else "to encode"
    print(f"{args.backend} collection {args.collection!r}: {len(collection)} passages stored, {len(todo)} {verb} "
          f"of {len(ids)}", file=sys.stderr)

    from trine.progress import bar as progress_bar

    # one bar over the whole build (the encoder's own bars are per chunk)
    written = progress_bar(total=len(todo), desc="index", unit="passage", disable=args.quiet)

    def write(part: list[int], docs: dict[str, Any]) -> None:
        collection.upsert(docs, [ids[i] for i in part], None if args.no_text else [texts[i] for i in part],
                          batch_size=args.upsert_batch)
        written.update(len(part))

    if enc is not None:
        wanted = set(todo)
        for start, shard_ids, shard in _shard_rows(enc, ids):
            rows = [r for r in range(len(shard_ids)) if start + r in wanted]
            for a in range(0, len(rows), args.chunk_size):
                chunk = rows[a:a + args.chunk_size]
                write([start + r for r in chunk], _take(shard, chunk, outputs))
    else:
        for start in range(0, len(todo), args.chunk_size):
            part = todo[start:start + args.chunk_size]
            write(part, dict(encoder.encode_result([texts[i] for i in part], outputs, kind="passage")))
    written.close()


def _take(result: Any, rows: list[int], outputs: tuple[str, ...]) -> dict[str, Any]:
    """Rows ``rows`` of an encode result, as the encode-output dictionary a collection takes."""
    import numpy as np

    out: dict[str, Any] = {}
    if "dense" in outputs:
        out["dense_vecs"] = np.asarray(result.dense_vecs)[rows]
    if "sparse" in outputs:
        out["lexical_weights"] = [result.lexical_weights[r] for r in rows]
    if "colbert" in outputs:
        out["colbert_vecs"] = [result.colbert_vecs[r] for r in rows]
    return out


def _open_retriever(args: argparse.Namespace, encoder: Any) -> tuple[Any, Any]:
    """(HybridRetriever, collection or None) for the searched index, refusing a collection of another model."""
    if args.backend == "trine":
        from trine.retrieval import HybridRetriever

        if not args.uri:
            raise OptionError("--backend trine searches a saved index folder: give it as --uri")
        return HybridRetriever.load(args.uri), None
    from trine.retrieval.vectordb import ModelSignature, collection_class

    collection = collection_class(args.backend).open(args.collection, **_connection(args))
    collection.check_model(ModelSignature.of_encoder(encoder, collection.representations))
    return collection.retriever(), collection


def _queries(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.queries:
        from trine.data.corpus import read_queries

        queries = read_queries(args.queries)
        return list(queries), list(queries.values())
    if not args.query:
        raise OptionError("give --query TEXT (repeatable) or --queries FILE")
    from trine.data.text import text_problem

    for i, text in enumerate(args.query):
        if text_problem(text):
            raise OptionError(f"--query (number {i + 1}): {text_problem(text)}")
    return [str(i) for i in range(len(args.query))], list(args.query)


def _search(args: argparse.Namespace) -> int:
    from trine.retrieval import QueryReps

    if args.k < 1:
        raise OptionError(f"--k must be positive, got {args.k}")
    resolve_model_options(args, "model")  # a folder, or a Hub id fetched into the Hugging Face cache
    qids, texts = _queries(args)
    encoder = _encoder(args)
    retriever, collection = _open_retriever(args, encoder)
    modes = mode_outputs(args.mode, args.colbert_search)
    missing = [m for m in modes if m not in retriever.indexes]
    if missing:
        raise OptionError(f"--mode {args.mode} needs {', '.join(missing)}, which this index does not hold")
    reps = encoder.encode_result(texts, modes, kind="query")
    names = FUSED_MODES
    weights = confidence = None
    normalization = "none"
    if args.mode in names:
        from trine.modeling.fusion import DEFAULT_WEIGHTS, read_fusion  # here: --help loads no torch

        # score fusion as `trine eval` and /search fuse: the model folder's fusion.json (tuned on a dev split by
        # `trine eval --tune-weights`), else the BGE-M3 paper's weights; --weights fuse plainly with the file's
        # normalization. Reciprocal rank fusion in the engine is unweighted unless asked (1 / (60 + rank)).
        saved = None if args.engine_fusion else read_fusion(args.model)
        if args.weights:
            values = args.weights
        elif args.engine_fusion == "rrf":
            values = (1.0,) * len(names[args.mode])
        elif saved is not None and args.mode in saved.weights:
            values = saved.weights[args.mode]
            coefficients = saved.coefficients(args.mode)
            confidence = None if coefficients is None else dict(zip(names[args.mode], coefficients))
        else:
            values = DEFAULT_WEIGHTS[args.mode]
        if saved is not None:
            normalization = saved.normalization
        if len(values) != len(names[args.mode]):
            raise OptionError(f"--weights for {args.mode}: {len(names[args.mode])} numbers "
                              f"({','.join(names[args.mode])}), got {values}")
        weights = dict(zip(names[args.mode], values))
    if args.engine_fusion:
        if collection is None:
            raise OptionError("--engine-fusion fuses inside a vector database: --backend milvus or qdrant")
        if weights is None or "colbert" in weights:
            raise OptionError("--engine-fusion fuses --mode sparse+dense")
        with options_checked():
            result = collection.engine_search(dict(reps), args.k, weights, fusion=args.engine_fusion,
                                              candidate_k=max(args.candidate_k, args.k))
    else:
        with options_checked():
            result = retriever.search_mode(QueryReps.from_encode(dict(reps)), args.mode, args.k,
                                           rerank_k=max(args.candidate_k, args.k), weights=weights,
                                           colbert_search=args.colbert_search, normalization=normalization,
                                           confidence=confidence)
    ids = retriever.ids
    for qid, text, rows, scores in zip(qids, texts, result.rows, result.scores):
        hits = [{"id": ids[r], "score": round(float(s), 6)} for r, s in zip(rows.tolist(), scores.tolist()) if r >= 0]
        print(json.dumps({"query_id": qid, "query": text, "hits": hits}, ensure_ascii=False))
    if collection is not None:
        collection.close()
    return 0


def _delete(args: argparse.Namespace) -> int:
    from trine.retrieval.vectordb import collection_class

    if args.backend == "trine":
        raise OptionError("trine index delete works on a vector database (--backend milvus or qdrant); a saved "
                          "trine index is rebuilt")
    ids = [d for d in args.ids.split(",") if d]
    if not ids:
        raise OptionError("--ids: give comma-separated document ids")
    collection = collection_class(args.backend).open(args.collection, **_connection(args))
    with options_checked():
        try:
            collection.delete(ids)
        except KeyError as err:
            raise OptionError(f"--ids: {err.args[0]}") from None
    print(f"deleted {len(ids)}; {args.backend} collection {args.collection!r} holds {len(collection)} passages")
    collection.close()
    return 0


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--backend", default="trine", choices=["trine", "milvus", "qdrant"],
                   help="trine: trine's indexes in a folder; milvus: Milvus Lite file or server URL; qdrant: local "
                        "folder, :memory: or server URL")
    p.add_argument("--uri", default=None,
                   help="trine: the index folder; milvus: a .db file (Milvus Lite, default trine_milvus.db) or "
                        "http://host:19530; qdrant: a folder (local mode, default trine_qdrant) or http://host:6333")
    p.add_argument("--collection", default="trine", help="collection name in the database")
    if model:
        p.add_argument("--model", required=True, help="model folder or Hugging Face Hub id (org/name[@revision]; "
                                                      "the one that built the collection)")
        add_hub_options(p)
        p.add_argument("--heads", default="none", choices=["none", "neutral", "random", "bm25"],
                       help="how to start heads for a folder without head files (none: index its dense output "
                            "only)")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--query_max_len", type=int, default=64)
        p.add_argument("--passage_max_len", type=int, default=None,
                       help=f"passage tokens (default {DEFAULT_PASSAGE_MAX_LEN}; with --embeddings: as encoded)")
        p.add_argument("--devices", "--device", default=None, help="cpu, cuda:0, ... (default: one device)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build, search and update indexes: trine's, Milvus or Qdrant")
    isub = index.add_subparsers(dest="index_command", required=True)

    b = isub.add_parser("build", help="encode a corpus.jsonl into an index or a database collection (resumable)")
    _common(b)
    b.add_argument("--corpus", required=True, help="corpus.jsonl (BEIR _id/title/text, or custom id/title/text)")
    b.add_argument("--embeddings", default=None, metavar="ENC_DIR",
                   help="index the encodings `trine encode` wrote for this corpus with this model (nothing is "
                        "encoded; the folder's outputs by default)")
    b.add_argument("--outputs", default=None,
                   help="comma-separated dense,sparse,colbert (default: all the model gives)")
    b.add_argument("--dense-index", default="flat", choices=["flat", "hnsw"],
                   help="flat: exact search; hnsw: approximate (trine: FAISS HNSW; Milvus HNSW; Qdrant server HNSW)")
    add_colbert_index_options(b)
    b.add_argument("--chunk-size", type=int, default=1024, help="passages encoded and written per step")
    b.add_argument("--upsert-batch", type=int, default=256, help="documents per database write")
    b.add_argument("--update", action="store_true", help="encode and write stored ids again (replacing them)")
    b.add_argument("--no-text", action="store_true", help="store vectors and ids only, not the passages' texts")
    b.add_argument("--overwrite", action="store_true", help="--backend trine: replace an index folder trine wrote")
    b.set_defaults(func=_build)

    s = isub.add_parser("search", help="search an index or collection; one JSON line of hits per query")
    _common(s)
    s.add_argument("--query", action="append", default=[], help="a query text (repeatable)")
    s.add_argument("--queries", default=None, help="queries.jsonl (_id/id and text)")
    s.add_argument("--mode", default="dense", choices=list(SEARCH_MODES))
    s.add_argument("--weights", type=floats, default=None,
                   help="fused modes' weights: dense,sparse or dense,sparse,colbert (default: the model folder's "
                        "fusion.json, tuned by trine eval --tune-weights, with its normalization; else 1,0.3 and "
                        "1,0.3,1; 1,1 with --engine-fusion rrf)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--candidate-k", type=int, default=100,
                   help="first-stage depth (colbert with --colbert-search rerank: dense candidates)")
    s.add_argument("--colbert-search", default="rerank", choices=["rerank", "full"],
                   help="--mode colbert: rerank (exact maxsim of the dense top --candidate-k) or full (the colbert "
                        "index's own search: an exact scan, or a plaid index's candidate generation)")
    s.add_argument("--engine-fusion", default=None, choices=["rrf", "weighted"],
                   help="fuse sparse+dense inside the database (its RRF or weighted ranker) instead of trine's exact "
                        "weighted fusion")
    s.set_defaults(func=_search)

    d = isub.add_parser("delete", help="delete passages by id from a database collection")
    _common(d, model=False)
    d.add_argument("--ids", required=True, help="comma-separated document ids")
    d.set_defaults(func=_delete)
