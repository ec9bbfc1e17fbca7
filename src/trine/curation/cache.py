"""On-disk cache of corpus encodings for curation commands.

An entry is keyed by everything that decides the vectors: the model's weights and tokenizer
(hashed from the loaded model, so a retrained model in the same folder never reuses stale
vectors), the encoder settings (pooling, normalisation, precision, maximum length, instruction,
MCLS), which outputs were asked for, and the texts themselves (in order). An entry is a folder
written whole or not at all (:func:`trine.io.atomic_folder`): ``meta.json``, ``dense.npy`` and,
for lexical weights, ``lexical.npz`` (CSR arrays of token ids and weights), for multi-vectors
``colbert.npz`` (the token vectors and each text's offset). That format, its
writer and the model fingerprint live in :mod:`trine.inference.shards`, shared with ``trine encode``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from trine.inference.result import EncodeResult
from trine.inference.shards import (  # the one encodings format, shared with `trine encode`'s shards
    EncodingsWriter,
    csr_to_lexical,
    encoder_settings,
    model_fingerprint,
    read_colbert,
    read_dense_blocks,
    texts_fingerprint,
)
from trine.io import atomic_folder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
OUTPUTS = ("dense", "sparse", "colbert")


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


class EmbeddingCache:
    """A folder of cache entries (one sub-folder per key)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key)


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
        if "colbert" in outputs and "colbert" not in embedder.outputs:
            raise ValueError("multi-vectors (colbert) need a model with BGE-M3 heads (an M3Embedder)")
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
        colbert = read_colbert(folder, len(self.texts)) if "colbert" in self.outputs else None
        start = 0
        for dense in read_dense_blocks(os.path.join(folder, "dense.npy"), self.block_size):
            end = start + dense.shape[0]
            if "sparse" in self.outputs:
                lexical = csr_to_lexical(indptr[start : end + 1] - indptr[start], ids[indptr[start] : indptr[end]],
                                         vals[indptr[start] : indptr[end]])
            yield EncodeResult(dense, lexical, None if colbert is None else colbert[start:end])
            start = end
        if start != len(self.texts):
            raise ValueError(f"{folder}/dense.npy: {start} rows for {len(self.texts)} texts")

    def _encode_and_write(self) -> Iterator[EncodeResult]:
        n = len(self.texts)
        with atomic_folder(self.cache.path(self.key), if_exists="keep") as tmp:
            writer = EncodingsWriter(tmp, n, self.outputs)
            try:
                for s in range(0, n, self.block_size):
                    block = self._encode(list(self.texts[s : s + self.block_size]))
                    writer.add(block)
                    yield block
                writer.finish({"format": CACHE_FORMAT, "key": self.key})
            except BaseException:
                writer.abort()
                raise
        logger.info("embedding cache written: %s", self.cache.path(self.key))
