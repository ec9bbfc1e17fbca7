"""On-disk cache of corpus encodings for curation commands.

An entry is keyed by everything that decides the vectors: the model's weights and tokenizer
(hashed from the loaded model, so a retrained model in the same folder never reuses stale
vectors), the encoder settings (pooling, normalisation, precision, maximum length, instruction,
MCLS), which outputs were asked for, and the texts themselves (in order). An entry is a folder
written whole or not at all (:func:`trine.io.atomic_folder`): ``meta.json``, ``dense.npy`` and,
for lexical weights, ``lexical.npz`` (CSR arrays of token ids and weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from trine.inference.result import EncodeResult
from trine.io import atomic_folder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
OUTPUTS = ("dense", "sparse")


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


def cache_key(embedder: Any, texts: Sequence[str], outputs: Sequence[str], role: str = "corpus") -> str:
    bad = set(outputs) - set(OUTPUTS)
    if bad or not outputs:
        raise ValueError(f"outputs must be a non-empty choice of {OUTPUTS}, got {list(outputs)}")
    payload = {
        "format": CACHE_FORMAT,
        "model": model_fingerprint(embedder.model),
        "settings": encoder_settings(embedder, role),
        "outputs": sorted(outputs),
        "texts": texts_fingerprint(texts),
        "count": len(texts),
        "role": role,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _lexical_to_csr(weights: Sequence[dict[str, float]]) -> dict[str, np.ndarray]:
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


def _csr_to_lexical(indptr: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> list[dict[str, float]]:
    keys = ids.astype(str).tolist()
    values = vals.astype(np.float64).tolist()
    return [dict(zip(keys[a:b], values[a:b])) for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())]


class EmbeddingCache:
    """A folder of cache entries (one sub-folder per key)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key)


def _npy_header(f, shape: tuple[int, int]) -> None:
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


class CorpusEncodings:
    """A corpus's encodings, block by block: read from the cache on a hit, else encoded (and, with a
    cache folder, written to a new entry as they come; the entry appears only once complete).

    ``status`` is "hit", "miss" or "off". Blocks are :class:`EncodeResult` objects with ``dense_vecs``
    (block x dim float32) and ``lexical_weights`` (a list, or None), in text order.
    """

    def __init__(self, embedder: Any, texts: Sequence[str], outputs: Sequence[str],
                 cache_dir: str | os.PathLike | None, block_size: int = 16384):
        bad = set(outputs) - set(OUTPUTS)
        if bad or "dense" not in outputs:
            raise ValueError(f"outputs must include 'dense' and be a choice of {OUTPUTS}, got {list(outputs)}")
        if "sparse" in outputs and "sparse" not in embedder.outputs:
            raise ValueError("lexical (sparse) weights need a model with BGE-M3 heads (an M3Embedder)")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.embedder, self.texts, self.outputs, self.block_size = embedder, texts, tuple(outputs), block_size
        self.cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
        self.key = cache_key(embedder, texts, outputs, "corpus") if self.cache is not None else None
        if self.cache is None:
            self.status = "off"
        else:
            self.status = "hit" if os.path.exists(os.path.join(self.cache.path(self.key), "meta.json")) else "miss"

    def _encode(self, texts: list[str]) -> EncodeResult:
        return self.embedder.encode_result(texts, self.outputs, kind="passage")

    def blocks(self) -> Iterator[EncodeResult]:
        if self.status == "hit":
            yield from self._read()
            return
        if self.cache is None:
            for s in range(0, len(self.texts), self.block_size):
                yield self._encode(list(self.texts[s : s + self.block_size]))
            return
        yield from self._encode_and_write()

    def _read(self) -> Iterator[EncodeResult]:
        folder = self.cache.path(self.key)
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != self.key or meta.get("count") != len(self.texts):
            raise ValueError(f"{folder}/meta.json: not a complete cache entry for these texts")
        lexical = None
        if "sparse" in self.outputs:
            with np.load(os.path.join(folder, "lexical.npz")) as z:
                indptr, ids, vals = z["indptr"], z["ids"], z["weights"]
            if indptr.size != len(self.texts) + 1:
                raise ValueError(f"{folder}/lexical.npz: wrong number of rows")
        start = 0
        for dense in read_dense_blocks(os.path.join(folder, "dense.npy"), self.block_size):
            end = start + dense.shape[0]
            if "sparse" in self.outputs:
                lexical = _csr_to_lexical(indptr[start : end + 1] - indptr[start], ids[indptr[start] : indptr[end]],
                                          vals[indptr[start] : indptr[end]])
            yield EncodeResult(dense, lexical)
            start = end
        if start != len(self.texts):
            raise ValueError(f"{folder}/dense.npy: {start} rows for {len(self.texts)} texts")

    def _encode_and_write(self) -> Iterator[EncodeResult]:
        n = len(self.texts)
        with atomic_folder(self.cache.path(self.key), if_exists="keep") as tmp:
            lexical_parts: list[dict[str, np.ndarray]] = []
            with open(os.path.join(tmp, "dense.npy"), "wb") as f:
                for s in range(0, n, self.block_size):
                    block = self._encode(list(self.texts[s : s + self.block_size]))
                    if s == 0:
                        _npy_header(f, (n, int(block["dense_vecs"].shape[1])))
                    f.write(np.ascontiguousarray(block["dense_vecs"], dtype=np.float32).tobytes())
                    if "sparse" in self.outputs:
                        lexical_parts.append(_lexical_to_csr(block["lexical_weights"]))
                    yield block
            if "sparse" in self.outputs:
                offsets = np.cumsum([0] + [int(p["indptr"][-1]) for p in lexical_parts])
                indptr = np.concatenate([[0]] + [p["indptr"][1:] + o for p, o in zip(lexical_parts, offsets)])
                np.savez(os.path.join(tmp, "lexical.npz"), indptr=indptr.astype(np.int64),
                         ids=np.concatenate([p["ids"] for p in lexical_parts]),
                         weights=np.concatenate([p["weights"] for p in lexical_parts]))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"format": CACHE_FORMAT, "key": self.key, "count": n, "outputs": sorted(self.outputs)}, f)
        logger.info("embedding cache written: %s", self.cache.path(self.key))
