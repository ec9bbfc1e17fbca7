"""Encoded corpora on disk: sharded, resumable, in the embedding cache's format.

``trine encode`` (:func:`encode_corpus`) turns a corpus JSONL (BEIR ``_id``/``title``/``text``, or
FlagEmbedding's ``id``/``title``/``text``; a passage is encoded as ``title + " " + text``, as ``trine
eval`` does) into the chosen outputs (dense, lexical, ColBERT), cut into contiguous shards. The
folder it writes::

    OUT/.trine-output            trine's marker (trine.io)
    OUT/manifest.json            what decides the vectors: model fingerprint, encoder settings,
                                 outputs, corpus sha256 and size, the shard plan, and their ``key``
                                 (sha256 of the identity: every reader checks it, so an edited
                                 manifest is refused)
    OUT/shard-00000-of-00003/    one folder per shard, written whole or not at all
        meta.json                {"format", "key", "count", "outputs", "shard", "start", "end"}
        ids.json                 the shard's document ids, in corpus order
        dense.npy                (count x dim) float32
        lexical.npz              CSR: indptr (count+1), ids (token ids), weights
        colbert.npz              indptr (count+1, token offsets), vecs (tokens x colbert_dim) float32

A shard folder is a cache entry of :mod:`trine.curation.cache` plus ``ids.json`` and ``colbert.npz``:
the cache writes its entries with the same :class:`EncodingsWriter` and reads them with the same
readers. A shard counts as finished only when its folder exists with a ``meta.json`` carrying the
manifest's key; a killed run leaves at most a temp folder, which the next run removes and redoes.
A re-run with other options (another model, outputs, maximum length, corpus, shard count) is refused
instead of mixing vectors.

Who encodes which shard: one process all shards (or ``shard_ids``); under ``torchrun`` rank ``r`` of
``w`` takes shards ``r, r+w, ...`` and waits for the others at a final barrier (gloo); with
``engine="ray"`` Ray Data actors (one per device, or ``ray_actors``) run the same encoder and this
process writes the shards as the rows come back in order.

Reader API (for ``trine index build --embeddings DIR`` and anyone else)::

    enc = load_encoded("OUT")                 # every shard, checked against the manifest
    enc.ids                                   # list of document ids, corpus order
    enc.result.dense_vecs                     # (n x dim) float32, or None
    enc.result.lexical_weights                # list of {token id string: weight}, or None
    enc.result.colbert_vecs                   # list of (tokens x dim) arrays, or None
    enc.manifest                              # the manifest (model fingerprint, settings, ...)
    load_encoded("OUT", embedder=m)           # ... and refuse it unless encoded by m's weights and settings
    load_encoded("OUT", embedder=m, match="model", corpus_file="corpus.jsonl")
                                              # ... by m's weights (passage options as encoded), from this file
    for ids, part in open_encoded("OUT"):     # the same checks, then one shard at a time
        ...

``load_encoded(folder, outputs=("dense",))`` reads only some outputs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import numpy as np
import torch

from trine.data.corpus import corpus_passages, read_corpus
from trine.errors import InputError, MissingInputError, OptionError, OutputPathError, UserError
from trine.inference.result import OUTPUTS, EncodeResult, check_outputs
from trine.io import (
    atomic_file,
    atomic_folder,
    check_output_path,
    file_sha256,
    is_trine_folder,
    parent_lock,
    write_marker,
)
from trine.partition import contiguous_bounds

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
META = "meta.json"
DEFAULT_BLOCK_SIZE = 16384
Engine = Literal["local", "ray"]


# ------------------------------------------------------------------------------- identities
def model_fingerprint(model: Any) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes) and its tokenizer.

    Computed from what is loaded, not from file names or dates, and again on every call (a model
    changed in memory gets a new key; hashing costs about a second per GB of weights).
    """
    h = hashlib.sha256()
    parts = getattr(model, "fingerprint_parts", None)  # a model that is not a torch module (an ONNX graph)
    for part in parts() if parts is not None else ():
        h.update(part)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items() if parts is None else ()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # truncation and padding are call-time state the encoder sets itself, not part of the tokenizer
            spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
            h.update(json.dumps(spec, sort_keys=True).encode())
        else:
            h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (each length-prefixed, so no two lists collide by concatenation)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def encoder_settings(embedder: Any, role: str) -> dict[str, Any]:
    """The settings of ``embedder`` that change its ``role`` ('corpus' or 'queries') encodings."""
    if role not in ("corpus", "queries"):
        raise ValueError(f"role must be 'corpus' or 'queries', not {role!r}")
    model = embedder.model
    prefix = "passage" if role == "corpus" else "query"
    return {
        "class": type(embedder).__name__,
        "pooling_method": model.pooling_method,
        "normalize_embeddings": bool(model.normalize_embeddings),
        "dtype": str(embedder.dtype),
        "max_length": getattr(embedder, f"{prefix}_max_length"),
        "instruction": getattr(embedder, f"{prefix}_instruction_for_retrieval"),
        "instruction_format": getattr(embedder, f"{prefix}_instruction_format"),
        "mcls_interval": embedder.mcls_interval,
    }


# ------------------------------------------------------------------- the encodings format
def lexical_to_csr(weights: Sequence[dict[str, float]]) -> dict[str, np.ndarray]:
    """Lexical weights as CSR arrays: ``indptr`` (rows+1), ``ids`` (int64 token ids), ``weights`` (float32)."""
    indptr = np.zeros(len(weights) + 1, dtype=np.int64)
    for i, w in enumerate(weights):
        indptr[i + 1] = indptr[i] + len(w)
    ids = np.empty(int(indptr[-1]), dtype=np.int64)
    vals = np.empty(int(indptr[-1]), dtype=np.float32)
    for i, w in enumerate(weights):
        a, b = indptr[i], indptr[i + 1]
        ids[a:b] = np.fromiter((int(k) for k in w), dtype=np.int64, count=len(w))
        vals[a:b] = np.fromiter(w.values(), dtype=np.float32, count=len(w))
    return {"indptr": indptr, "ids": ids, "weights": vals}


def csr_to_lexical(indptr: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> list[dict[str, float]]:
    keys = ids.astype(str).tolist()
    values = vals.astype(np.float64).tolist()
    return [dict(zip(keys[a:b], values[a:b])) for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())]


def write_npy_header(f: IO[bytes], shape: tuple[int, int]) -> None:
    """The header of a C-order float32 ``.npy`` matrix, so rows can be appended as they are encoded."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                             "fortran_order": False, "shape": shape})


def read_dense_blocks(path: str, rows_per_block: int) -> Iterator[np.ndarray]:
    """Rows of a float32 (n x dim) ``.npy`` file, ``rows_per_block`` at a time, read (not memory-mapped),
    so only one block is resident beside whatever the caller keeps."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran or dtype != np.float32 or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-order float32 matrix, got {dtype} {shape}")
        for start in range(0, shape[0], rows_per_block):
            count = min(rows_per_block, shape[0] - start)
            block = np.fromfile(f, dtype=np.float32, count=count * shape[1])
            if block.size != count * shape[1]:
                raise ValueError(f"{path}: file ends early")
            yield block.reshape(count, shape[1])


def read_lexical(folder: str, count: int) -> list[dict[str, float]]:
    path = os.path.join(folder, "lexical.npz")
    with np.load(path) as z:
        indptr, ids, vals = z["indptr"], z["ids"], z["weights"]
    if indptr.size != count + 1:
        raise InputError(f"{path}: {indptr.size - 1} rows, expected {count}")
    return csr_to_lexical(indptr, ids, vals)


def read_colbert(folder: str, count: int) -> list[np.ndarray]:
    path = os.path.join(folder, "colbert.npz")
    with np.load(path) as z:
        indptr, vecs = z["indptr"], z["vecs"]
    if indptr.size != count + 1 or vecs.ndim != 2 or int(indptr[-1]) != vecs.shape[0]:
        raise InputError(f"{path}: malformed ({indptr.size - 1} rows for {count}, vecs {vecs.shape})")
    return [vecs[a:b] for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())]


class EncodingsWriter:
    """Encodings of ``count`` texts appended block by block into a folder being written (the temp folder
    of :func:`trine.io.atomic_folder`): dense rows stream to ``dense.npy``; lexical weights and
    multi-vectors are kept as compact arrays and written by :meth:`finish` with ``meta.json`` last."""

    def __init__(self, folder: str, count: int, outputs: Sequence[str]):
        self.folder, self.count, self.outputs = folder, count, check_outputs(outputs)
        self.rows = 0
        self._dense: IO[bytes] | None = None
        self._lexical: list[dict[str, np.ndarray]] = []
        self._colbert: list[np.ndarray] = []

    def add(self, block: EncodeResult) -> None:
        n = len(block.rows())
        if self.rows + n > self.count:
            raise ValueError(f"{self.folder}: more than the {self.count} rows announced")
        if "dense" in self.outputs:
            if self._dense is None:
                self._dense = open(os.path.join(self.folder, "dense.npy"), "wb")
                write_npy_header(self._dense, (self.count, int(block.dense_vecs.shape[1])))
            self._dense.write(np.ascontiguousarray(block.dense_vecs, dtype=np.float32).tobytes())
        if "sparse" in self.outputs:
            self._lexical.append(lexical_to_csr(block.lexical_weights))
        if "colbert" in self.outputs:
            self._colbert.extend(np.asarray(v, dtype=np.float32) for v in block.colbert_vecs)
        self.rows += n

    def finish(self, meta: dict[str, Any]) -> None:
        """Close the files and write ``meta.json`` (what makes the folder complete) with ``meta`` in it."""
        if self._dense is not None:
            self._dense.close()
        if self.rows != self.count:
            raise ValueError(f"{self.folder}: {self.rows} rows written, {self.count} announced")
        if "sparse" in self.outputs:
            parts = self._lexical
            offsets = np.cumsum([0] + [int(p["indptr"][-1]) for p in parts])
            indptr = np.concatenate([[0]] + [p["indptr"][1:] + o for p, o in zip(parts, offsets)])
            np.savez(os.path.join(self.folder, "lexical.npz"), indptr=indptr.astype(np.int64),
                     ids=np.concatenate([p["ids"] for p in parts] or [np.zeros(0, np.int64)]),
                     weights=np.concatenate([p["weights"] for p in parts] or [np.zeros(0, np.float32)]))
        if "colbert" in self.outputs:
            lengths = [v.shape[0] for v in self._colbert]
            np.savez(os.path.join(self.folder, "colbert.npz"),
                     indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     vecs=np.concatenate(self._colbert) if self._colbert else np.zeros((0, 0), np.float32))
        with open(os.path.join(self.folder, META), "w") as f:
            json.dump({"format": FORMAT, "count": self.count, "outputs": sorted(self.outputs), **meta}, f)

    def abort(self) -> None:
        if self._dense is not None:
            self._dense.close()


# ------------------------------------------------------------------------------- the corpus
def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def build_manifest(embedder: Any, corpus_file: str, count: int, outputs: Sequence[str], num_shards: int
                   ) -> dict[str, Any]:
    """The manifest: ``identity`` (everything that decides the vectors and where they lie), its ``key``,
    and for the reader's information the corpus path."""
    identity = {
        "format": FORMAT,
        "model": model_fingerprint(embedder.model),
        "settings": encoder_settings(embedder, "corpus"),
        "truncate_dim": embedder.truncate_dim,
        "outputs": list(check_outputs(outputs)),
        "corpus": {"sha256": file_sha256(corpus_file), "count": count},
        "shards": [list(r) for r in contiguous_bounds(count, num_shards)],
    }
    return {"identity": identity, "key": _key(identity), "corpus_file": os.path.abspath(corpus_file)}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


def _open_folder(output_dir: str, manifest: dict[str, Any], inputs: Sequence[str]) -> bool:
    """Create the output folder with its manifest, or check that an existing one was made with these
    options (any process may call it; the parent folder's lock makes the first one create it). True when
    this call created it."""
    path = os.path.abspath(output_dir)
    check_output_path(output_dir, inputs=inputs, overwrite=True)  # the path itself (links, inputs, cwd)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with parent_lock(path):  # torchrun's ranks open the folder one after another
        exists = os.path.isdir(path) and bool(os.listdir(path))
        # a trine folder is resumed, not replaced: only its manifest decides whether it fits
        check_output_path(output_dir, inputs=inputs, overwrite=exists and is_trine_folder(path))
        target = os.path.join(path, MANIFEST)
        if exists:
            if not os.path.exists(target):
                raise OutputPathError(f"{output_dir}: a trine folder without {MANIFEST} (not written by trine encode); "
                                      "choose a new folder")
            old = read_manifest(path)
            changed = _differences(old.get("identity"), manifest["identity"])
            if changed:
                raise OutputPathError(f"{target}: this folder was encoded with another model, corpus or options "
                                      f"(different: {', '.join(changed)}); choose a new folder")
            return False
        os.makedirs(path, exist_ok=True)
        write_marker(path, command="trine encode")
        with atomic_file(target) as f:
            json.dump(manifest, f, indent=1)
        return True


def shard_done(folder: str, key: str) -> bool:
    """A shard counts as finished when its folder holds a ``meta.json`` with the manifest's key (the
    folder appears only once complete, so a killed run leaves none)."""
    meta = os.path.join(folder, META)
    if not os.path.isfile(meta):
        return False
    try:
        return _read_json(meta).get("key") == key
    except InputError:
        return False


# ------------------------------------------------------------------------------- encoding
def load_embedder(model: str | os.PathLike, **options: Any) -> Any:
    """The encoder ``trine encode`` (and ``index``, ``serve``) runs, as the model's family says
    (:func:`trine.modeling.families.resolve_family`): an M3Embedder for a family with lexical and ColBERT
    outputs, or for a plain encoder given ``init_missing_heads``; else a dense-only Embedder. A reranker, or
    ``init_missing_heads`` for a family that cannot start heads, is an error naming the family. Unknown
    options raise."""
    from trine.inference.embedder import Embedder, M3Embedder
    from trine.modeling.families import resolve_family

    # a folder, or a Hub id fetched into the Hugging Face cache; its family the one it records or shows
    family, model = resolve_family(model, "embedder")
    heads = options.get("init_missing_heads") is not None
    if heads and not family.new_heads and "sparse" not in family.outputs:
        raise OptionError(f"{model}: {family.describe()}: init_missing_heads (--heads) starts BGE-M3 heads on an "
                          "encoder; this family takes none")
    if "sparse" in family.outputs or (heads and family.new_heads):
        return M3Embedder(model, model_family=family.name, **options)
    return Embedder(model, model_family=family.name, **options)


@dataclass
class EncodeSummary:
    """What one call of :func:`encode_corpus` did (in this process)."""

    output_dir: str
    documents: int
    num_shards: int
    encoded: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{self.output_dir}: {self.documents} documents in {self.num_shards} shard(s); encoded here: "
                f"{len(self.encoded)}, already finished: {len(self.skipped)}"]


def dist_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (its environment variables), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def encode_corpus(
    model: str | os.PathLike | Any,
    corpus_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    outputs: Sequence[str] = ("dense",),
    num_shards: int = 1,
    shard_ids: Sequence[int] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    engine: Engine = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    **embedder_options: Any,
) -> EncodeSummary:
    """Encode ``corpus_file`` into ``output_dir`` (layout in the module docstring); return a summary.

    ``model``: a model folder (loaded by :func:`load_embedder` with ``embedder_options``) or a loaded
    encoder (local engine only). ``shard_ids``: the shards this process encodes (``None``: all, or
    under torchrun this rank's share). Finished shards are skipped, the rest encoded ``block_size``
    texts at a time, each shard swapped in whole. ``engine="ray"``: Ray Data actors (``ray_actors``,
    default one per device) each load ``model`` and encode; ``ray_address`` joins a running cluster.
    """
    corpus_file, output_dir = os.fspath(corpus_file), os.fspath(output_dir)
    if engine not in ("local", "ray"):
        raise OptionError(f"engine must be 'local' or 'ray', not {engine!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise OptionError(f"num_shards must be a positive integer, got {num_shards!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise OptionError(f"block_size must be a positive integer, got {block_size!r}")
    if engine != "ray" and (ray_address is not None or ray_actors is not None):
        raise OptionError("ray_address and ray_actors go with engine='ray' (--ray)")
    if ray_actors is not None and (isinstance(ray_actors, bool) or not isinstance(ray_actors, int) or ray_actors < 1):
        raise OptionError(f"ray_actors must be a positive integer, got {ray_actors!r}")
    by_path = isinstance(model, (str, os.PathLike))
    if engine == "ray" and not by_path:
        raise OptionError("engine='ray' needs the model folder (each actor loads its own copy), not a loaded encoder")
    if not by_path and embedder_options:
        raise OptionError(f"{', '.join(sorted(embedder_options))}: encoder options go with a model folder, "
                          "not with a loaded encoder")
    rank, world = dist_world()
    if world > 1 and (shard_ids is not None or engine == "ray"):
        raise OptionError("under torchrun each rank takes its own shards: no shard_ids (--shard-id) and no Ray")
    if shard_ids is not None:
        bad = [i for i in shard_ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_shards]
        if bad:
            raise OptionError(f"shard ids must lie in 0..{num_shards - 1} for {num_shards} shard(s), got {bad}")
    if not os.path.isfile(corpus_file):
        raise MissingInputError(f"{corpus_file}: no such corpus file")
    inputs = [corpus_file, *([os.fspath(model)] if by_path else [])]
    check_output_path(output_dir, inputs=inputs, overwrite=True)  # before anything is read or loaded
    outputs = check_outputs(outputs)
    if not outputs:
        raise OptionError(f"outputs: choose at least one of {', '.join(OUTPUTS)}")
    ids, texts = corpus_passages(read_corpus(corpus_file))
    if num_shards > len(ids):
        raise OptionError(f"num_shards {num_shards} is more than the {len(ids)} documents of {corpus_file}")
    if world > 1 and by_path and "devices" not in embedder_options and torch.cuda.is_available():
        embedder_options["devices"] = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per rank
    # with Ray this copy only fingerprints the model and checks the options: the actors hold the ones on devices
    local_options = {**embedder_options, "devices": "cpu"} if engine == "ray" else embedder_options
    embedder = load_embedder(model, **local_options) if by_path else model
    embedder.check_outputs(outputs, "outputs")  # what the model's family gives, else an error naming it
    manifest = build_manifest(embedder, corpus_file, len(ids), outputs, num_shards)
    mine = list(range(rank, num_shards, world)) if shard_ids is None else sorted(set(shard_ids))
    summary = EncodeSummary(output_dir, len(ids), num_shards)
    plan = contiguous_bounds(len(ids), num_shards)
    with _ranks_joined(world):
        created = _open_folder(output_dir, manifest, inputs)
        todo = []
        for i in mine:
            if shard_done(os.path.join(output_dir, shard_name(i, num_shards)), manifest["key"]):
                summary.skipped.append(i)
            else:
                todo.append(i)
        if todo:
            if engine == "ray":
                blocks = _ray_blocks(os.fspath(model), embedder_options, texts, [plan[i] for i in todo],
                                     outputs, block_size, ray_address, ray_actors)
            else:
                blocks = _local_blocks(embedder, texts, [plan[i] for i in todo], outputs, block_size)
            try:
                _write_shards(output_dir, manifest["key"], ids, todo, plan, outputs, blocks)
            except UserError:
                # a refusal while encoding (a non-finite vector): no folder this run made stays behind. A folder
                # resumed keeps its finished shards, and so does one a kill interrupts (it is resumed).
                if created and world == 1:
                    shutil.rmtree(output_dir, ignore_errors=True)
                raise
            summary.encoded = todo
    return summary


def _local_blocks(embedder: Any, texts: list[str], ranges: list[tuple[int, int]], outputs: Sequence[str],
                  block_size: int) -> Iterator[EncodeResult]:
    for start, end in ranges:
        for s in range(start, end, block_size):
            yield embedder.encode_result(texts[s:min(end, s + block_size)], outputs, kind="passage")


def _write_shards(output_dir: str, key: str, ids: list[str], todo: list[int], plan: list[tuple[int, int]],
                  outputs: Sequence[str], blocks: Iterator[EncodeResult]) -> None:
    """Consume ``blocks`` (the rows of the shards ``todo``, in order) into one shard folder after another."""
    num_shards = len(plan)
    pending = EncodeResult()  # rows received beyond the current shard's end (a block may span two shards)
    source = iter(blocks)
    for i in todo:
        start, end = plan[i]
        path = os.path.join(output_dir, shard_name(i, num_shards))
        with atomic_folder(path, overwrite=True) as tmp:
            writer = EncodingsWriter(tmp, end - start, outputs)
            try:
                while writer.rows < writer.count:
                    block = pending if pending.outputs else next(source)
                    take = writer.count - writer.rows
                    rows = block.rows()
                    if len(rows) <= take:
                        writer.add(block)
                        pending = EncodeResult()
                    else:  # a Ray batch running into the next shard
                        writer.add(EncodeResult.from_rows(rows[:take], outputs))
                        pending = EncodeResult.from_rows(rows[take:], outputs)
                with open(os.path.join(tmp, "ids.json"), "w", encoding="utf-8") as f:
                    json.dump(ids[start:end], f, ensure_ascii=False)
                writer.finish({"key": key, "shard": i, "start": start, "end": end})
            except BaseException:
                writer.abort()
                raise
        logger.info("shard written: %s", path)


@contextlib.contextmanager
def _ranks_joined(world: int) -> Iterator[None]:
    """Under torchrun: a gloo group joined before the work and one barrier after it (the only collective),
    so that no rank returns before every shard is written. Joined first, not at the end, because the
    rendezvous has a short timeout and ranks finish their shards far apart; the barrier waits a week."""
    if world == 1:
        yield
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        yield
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------- Ray
def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise OptionError(f"--ray needs Ray Data: pip install 'trine[ray]' ({err})") from None
    return ray


class _RayEncoder:
    """A Ray Data actor holding one copy of the encoder on its device; batches of {"row", "text"} in,
    {"row", and per output a column} out (lexical weights as JSON, multi-vectors as float32 bytes)."""

    def __init__(self, model: str, options: dict[str, Any], outputs: Sequence[str], use_gpu: bool):
        options = {**options, "devices": "cuda:0" if use_gpu else "cpu", "show_progress": False}
        self.embedder = load_embedder(model, **options)
        self.outputs = tuple(outputs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.embedder.encode_result([str(t) for t in batch["text"]], self.outputs, kind="passage")
        out = {"row": np.asarray(batch["row"], dtype=np.int64)}
        if "dense" in self.outputs:
            out["dense"] = np.asarray(result.dense_vecs, dtype=np.float32)
        if "sparse" in self.outputs:
            out["lexical"] = np.array([json.dumps(w) for w in result.lexical_weights], dtype=object)
        if "colbert" in self.outputs:
            vecs = [np.asarray(v, dtype=np.float32) for v in result.colbert_vecs]
            out["colbert"] = np.array([v.tobytes() for v in vecs], dtype=object)
            out["colbert_dim"] = np.array([v.shape[1] for v in vecs], dtype=np.int64)
        return out


def _from_ray_batch(batch: dict[str, np.ndarray], outputs: Sequence[str]) -> EncodeResult:
    dense = np.asarray(batch["dense"], dtype=np.float32) if "dense" in outputs else None
    lexical = [json.loads(s) for s in batch["lexical"]] if "sparse" in outputs else None
    colbert = ([np.frombuffer(b, dtype=np.float32).reshape(-1, int(d)) for b, d in
                zip(batch["colbert"], batch["colbert_dim"])] if "colbert" in outputs else None)
    return EncodeResult(dense, lexical, colbert)


def _ray_blocks(model: str, options: dict[str, Any], texts: list[str],
                ranges: list[tuple[int, int]], outputs: Sequence[str], block_size: int,
                address: str | None, actors: int | None) -> Iterator[EncodeResult]:
    """The rows of ``ranges`` encoded by Ray Data actors, yielded in row order (the writer needs it).

    An actor takes one GPU when the cluster has GPUs (unless ``devices`` in ``options`` names only CPUs),
    else one CPU; ``actors`` defaults to the devices named, else the cluster's GPUs, else 1. The model
    folder must be readable at the same path wherever an actor runs. A Ray instance started here is shut
    down at the end."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    elif address is not None:
        logger.warning("Ray is already initialised here; ray_address %s is not used", address)
    try:
        yield from _ray_map(ray, model, options, texts, ranges, outputs, block_size, actors)
    finally:
        if started:
            ray.shutdown()


def _ray_map(ray: Any, model: str, options: dict[str, Any], texts: list[str], ranges: list[tuple[int, int]],
             outputs: Sequence[str], block_size: int, actors: int | None) -> Iterator[EncodeResult]:
    devices = options.get("devices")
    named = [] if devices is None else [devices] if isinstance(devices, (str, int)) else list(devices)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and not (named and all(str(d) == "cpu" for d in named))
    actors = actors or (len(named) if named else gpus if use_gpu else 1)  # one actor per device
    options = {k: v for k, v in options.items() if k != "devices"}
    rows = [r for start, end in ranges for r in range(start, end)]
    context = ray.data.DataContext.get_current()
    keep_order = context.execution_options.preserve_order
    # rows come back in the order the shards are written; set before the dataset is made, which copies the
    # current context (set afterwards, it is not the dataset's: the order then holds only by chance)
    context.execution_options.preserve_order = True
    try:
        ds = ray.data.from_items([{"row": r, "text": texts[r]} for r in rows])
        if not ds.context.execution_options.preserve_order:
            raise RuntimeError("Ray Data did not take preserve_order for the encoding dataset")
        mapped = ds.map_batches(
            _RayEncoder, batch_size=block_size, batch_format="numpy",
            fn_constructor_kwargs={"model": model, "options": options, "outputs": tuple(outputs), "use_gpu": use_gpu},
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else 0,
            num_cpus=1,
        )
        expected = 0
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            got = np.asarray(batch["row"]).tolist()
            if got != rows[expected:expected + len(got)]:
                raise RuntimeError("Ray returned the rows out of order")
            expected += len(got)
            yield _from_ray_batch(batch, outputs)
        if expected != len(rows):
            raise RuntimeError(f"Ray returned {expected} of {len(rows)} rows")
    finally:
        context.execution_options.preserve_order = keep_order


# ------------------------------------------------------------------------------- reading
#: the encoder settings that decide the vector space a query must be encoded into (the rest: how passages were
#: encoded, e.g. their maximum length or dtype, which a reader may accept as they were)
SPACE_SETTINGS = ("class", "pooling_method", "normalize_embeddings")


@dataclass
class EncodedCorpus:
    """A ``trine encode`` folder read whole: ids in corpus order, their encodings, and the manifest."""

    ids: list[str]
    result: EncodeResult
    manifest: dict[str, Any]


@dataclass
class EncodedFolder:
    """A ``trine encode`` folder whose manifest and shards were checked (:func:`open_encoded`); iterating
    reads one shard at a time: ``(ids, EncodeResult)`` in corpus order, so a reader holds one shard at once."""

    folder: str
    manifest: dict[str, Any]
    outputs: tuple[str, ...]
    shards: list[tuple[str, int, int]]  # (shard folder, start, end)

    @property
    def count(self) -> int:
        return self.shards[-1][2] if self.shards else 0

    @property
    def settings(self) -> dict[str, Any]:
        """The passage encoder's settings recorded in the manifest."""
        return dict(self.manifest["identity"].get("settings") or {})

    def __iter__(self) -> Iterator[tuple[list[str], EncodeResult]]:
        for path, start, end in self.shards:
            yield read_shard(path, end - start, self.outputs)


def read_shard(path: str, count: int, outputs: Sequence[str]) -> tuple[list[str], EncodeResult]:
    """The ids and ``outputs`` of one finished shard folder of ``count`` documents."""
    shard_ids = _read_json(os.path.join(path, "ids.json"))
    if not isinstance(shard_ids, list) or len(shard_ids) != count:
        raise InputError(f"{os.path.join(path, 'ids.json')}: expected a list of {count} ids")
    lexical = read_lexical(path, count) if "sparse" in outputs else [None] * count
    colbert = read_colbert(path, count) if "colbert" in outputs else [None] * count
    result = EncodeResult.from_rows([(None, w, c) for w, c in zip(lexical, colbert)],
                                    [o for o in outputs if o != "dense"])
    if "dense" in outputs:
        dense = np.load(os.path.join(path, "dense.npy"))
        if dense.ndim != 2 or dense.shape[0] != count:
            raise InputError(f"{os.path.join(path, 'dense.npy')}: {dense.shape[0]} rows, expected {count}")
        result["dense_vecs"] = dense
    return [str(d) for d in shard_ids], result


def check_corpus_file(folder: str, manifest: dict[str, Any], corpus_file: str) -> None:
    """Refuse ``corpus_file`` unless it is the file the folder was encoded from (its SHA-256 recorded in the
    manifest). A manifest without the hash is refused too: nothing else could tell a corpus edited in place
    (same ids, other texts) from the one encoded."""
    where = os.path.join(folder, MANIFEST)
    recorded = manifest["identity"].get("corpus")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        raise InputError(f"{where}: identity.corpus.sha256: not recorded, so {corpus_file} cannot be checked "
                         "against the corpus encoded; encode it again with trine encode")
    if not os.path.isfile(corpus_file):
        raise MissingInputError(f"{corpus_file}: no such corpus file")
    sha = file_sha256(corpus_file)
    if sha != recorded["sha256"]:
        encoded_from = manifest.get("corpus_file", "?")
        raise InputError(f"{corpus_file}: not the corpus {folder} was encoded from (identity.corpus.sha256 "
                         f"{recorded['sha256'][:16]}..., this file {sha[:16]}...; encoded from {encoded_from}): "
                         "give that corpus, or encode this one with trine encode")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a ``trine encode`` folder, checked to be one (format, outputs, shard plan, model, settings)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MissingInputError(f"{folder}: no such folder")
    where = os.path.join(folder, MANIFEST)
    manifest = _read_json(where)
    identity = manifest.get("identity") if isinstance(manifest, dict) else None
    if not isinstance(identity, dict) or identity.get("format") != FORMAT:
        raise InputError(f"{where}: identity.format: not a trine encode manifest of format {FORMAT}")
    for name, kind in (("outputs", list), ("shards", list), ("model", str), ("settings", dict)):
        if not isinstance(identity.get(name), kind):
            raise InputError(f"{where}: identity.{name}: missing or not a {kind.__name__}")
    # the key is the identity's hash: an identity edited by hand (another model, settings or corpus claimed) or a
    # key edited (which no shard would then carry) is refused here, wherever a manifest is read
    if manifest.get("key") != _key(identity):
        raise InputError(f"{where}: key: does not match the manifest's identity (the manifest was edited); "
                         "encode the corpus again into a new folder")
    return manifest


def open_encoded(folder: str | os.PathLike, outputs: Sequence[str] | None = None, *, embedder: Any = None,
                 match: Literal["encoder", "model"] = "encoder", corpus_file: str | os.PathLike | None = None
                 ) -> EncodedFolder:
    """A ``trine encode`` folder, checked (nothing read beyond the manifest and the shards' ``meta.json``):
    ``outputs`` (default: all it holds) must be held, every shard finished. ``embedder`` (the encoder a
    caller will encode queries with): the folder must have been encoded by the same weights and tokenizer
    and, with ``match="encoder"``, every passage setting (maximum length, dtype, instruction, ...); with
    ``match="model"`` only the settings that decide the vector space (pooling, normalisation, encoder class,
    ``truncate_dim``). ``corpus_file``: must be the file encoded (:func:`check_corpus_file`). A mismatch raises
    :class:`InputError` naming the manifest and the fields that differ."""
    folder = os.fspath(folder)
    if match not in ("encoder", "model"):
        raise OptionError(f"match must be 'encoder' or 'model', not {match!r}")
    manifest = read_manifest(folder)
    where = os.path.join(folder, MANIFEST)
    identity = manifest["identity"]
    if embedder is not None:
        settings = encoder_settings(embedder, "corpus")
        old = {"model": identity["model"], "settings": identity["settings"],
               "truncate_dim": identity.get("truncate_dim")}
        new = {"model": model_fingerprint(embedder.model), "settings": settings,
               "truncate_dim": getattr(embedder, "truncate_dim", None)}
        if match == "model":
            old["settings"] = {k: v for k, v in old["settings"].items() if k in SPACE_SETTINGS}
            new["settings"] = {k: v for k, v in settings.items() if k in SPACE_SETTINGS}
        changed = _differences(old, new)
        if changed:
            config = getattr(getattr(embedder.model, "backbone", None), "config", None)
            name = getattr(config, "_name_or_path", None)  # the folder it was loaded from
            given = f"the encoder given ({name})" if name else "the encoder given"
            raise InputError(f"{where}: encoded by another model or with other settings than {given} (different: "
                             f"{', '.join(changed)})")
    held = tuple(identity["outputs"])
    outputs = held if outputs is None else check_outputs(outputs)
    absent = [o for o in outputs if o not in held]
    if absent:
        raise InputError(f"{folder}: encoded with outputs {', '.join(held)}; no {', '.join(absent)}")
    plan = [tuple(r) for r in identity["shards"]]
    names = [shard_name(i, len(plan)) for i in range(len(plan))]
    unfinished = [n for n in names if not shard_done(os.path.join(folder, n), manifest.get("key"))]
    if unfinished:
        shown = ", ".join(unfinished[:5]) + (", ..." if len(unfinished) > 5 else "")
        raise InputError(f"{folder}: {len(unfinished)} of {len(plan)} shard(s) not finished ({shown}): "
                         "run trine encode again")
    if corpus_file is not None:
        check_corpus_file(folder, manifest, os.fspath(corpus_file))
    return EncodedFolder(folder, manifest, tuple(outputs),
                         [(os.path.join(folder, n), int(a), int(b)) for n, (a, b) in zip(names, plan)])


def load_encoded(folder: str | os.PathLike, outputs: Sequence[str] | None = None, *, embedder: Any = None,
                 match: Literal["encoder", "model"] = "encoder", corpus_file: str | os.PathLike | None = None
                 ) -> EncodedCorpus:
    """Every shard of a ``trine encode`` folder, checked against its manifest (:func:`open_encoded`, whose
    keywords these are); ``outputs`` (default: all the folder holds) picks some. A missing or unfinished
    shard raises naming it; so does an ``embedder`` of other weights or settings."""
    enc = open_encoded(folder, outputs, embedder=embedder, match=match, corpus_file=corpus_file)
    ids: list[str] = []
    rows: list[tuple[Any, Any, Any]] = []
    dense_parts: list[np.ndarray] = []
    for shard_ids, part in enc:
        ids.extend(shard_ids)
        if "dense" in enc.outputs:
            dense_parts.append(part.dense_vecs)
        count = len(shard_ids)
        lexical = part.lexical_weights if "sparse" in enc.outputs else [None] * count
        colbert = part.colbert_vecs if "colbert" in enc.outputs else [None] * count
        rows.extend((None, w, c) for w, c in zip(lexical, colbert))
    result = EncodeResult.from_rows(rows, [o for o in enc.outputs if o != "dense"])
    if "dense" in enc.outputs:
        result["dense_vecs"] = np.concatenate(dense_parts)
    return EncodedCorpus(ids, result, enc.manifest)
