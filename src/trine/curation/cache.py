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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trine.io import atomic_folder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
OUTPUTS = ("dense", "sparse")


def model_fingerprint(model: Any) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes) and its tokenizer.

    Computed from what is loaded, not from file names or dates; remembered on the model object
    (an encoder's weights do not change while it encodes).
    """
    cached = getattr(model, "_trine_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
                 .encode())
    digest = h.hexdigest()
    try:
        model._trine_fingerprint = digest
    except AttributeError:
        pass
    return digest


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

    def load(self, key: str, outputs: Sequence[str]) -> dict[str, Any] | None:
        """The entry's encodings (dense memory-mapped), or None when there is no entry."""
        folder = self.path(key)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            return None
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError(f"{meta_path}: not a trine embedding-cache entry for key {key}")
        out: dict[str, Any] = {"dense_vecs": None, "lexical_weights": None}
        if "dense" in outputs:
            dense = np.load(os.path.join(folder, "dense.npy"), mmap_mode="r")
            if dense.shape[0] != meta["count"]:
                raise ValueError(f"{folder}/dense.npy: {dense.shape[0]} rows, meta.json says {meta['count']}")
            out["dense_vecs"] = dense
        if "sparse" in outputs:
            with np.load(os.path.join(folder, "lexical.npz")) as z:
                out["lexical_weights"] = _csr_to_lexical(z["indptr"], z["ids"], z["weights"])
            if len(out["lexical_weights"]) != meta["count"]:
                raise ValueError(f"{folder}/lexical.npz: wrong number of rows")
        return out

    def save(self, key: str, encoded: dict[str, Any], outputs: Sequence[str], count: int) -> None:
        with atomic_folder(self.path(key)) as tmp:
            if "dense" in outputs:
                np.save(os.path.join(tmp, "dense.npy"), np.asarray(encoded["dense_vecs"], dtype=np.float32))
            if "sparse" in outputs:
                np.savez(os.path.join(tmp, "lexical.npz"), **_lexical_to_csr(encoded["lexical_weights"]))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"format": CACHE_FORMAT, "key": key, "count": count, "outputs": sorted(outputs)}, f)


def encode_corpus_cached(embedder: Any, texts: Sequence[str], outputs: Sequence[str],
                         cache_dir: str | os.PathLike | None) -> tuple[dict[str, Any], str]:
    """``{"dense_vecs", "lexical_weights"}`` of ``texts`` as corpus, and "hit", "miss" or "off".

    Dense vectors come from the cache as a read-only memory map on a hit.
    """
    from trine.curation.common import dense_array, is_m3

    sparse = "sparse" in outputs
    if sparse and not is_m3(embedder):
        raise ValueError("lexical (sparse) weights need an M3Embedder (a model with BGE-M3 heads)")

    def encode() -> dict[str, Any]:
        if is_m3(embedder):
            enc = embedder.encode_corpus(list(texts), return_dense="dense" in outputs, return_sparse=sparse,
                                         return_colbert_vecs=False)
        else:
            enc = {"dense_vecs": embedder.encode_corpus(list(texts)), "lexical_weights": None}
        if "dense" in outputs:
            enc["dense_vecs"] = dense_array(enc)
        return {"dense_vecs": enc.get("dense_vecs"), "lexical_weights": enc.get("lexical_weights")}

    if cache_dir is None:
        return encode(), "off"
    cache = EmbeddingCache(cache_dir)
    key = cache_key(embedder, texts, outputs, "corpus")
    hit = cache.load(key, outputs)
    if hit is not None:
        logger.info("embedding cache hit: %s", cache.path(key))
        return hit, "hit"
    enc = encode()
    cache.save(key, enc, outputs, len(texts))
    logger.info("embedding cache written: %s", cache.path(key))
    return enc, "miss"
