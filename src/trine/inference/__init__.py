from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "EncodeResult": "trine.inference.result",
    "EncodedCorpus": "trine.inference.shards",
    "Embedder": "trine.inference.embedder",
    "Encoder": "trine.inference.encoder",
    "M3Embedder": "trine.inference.embedder",
    "Reranker": "trine.inference.reranker",
    "encode_corpus": "trine.inference.shards",
    "load_encoded": "trine.inference.shards",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
