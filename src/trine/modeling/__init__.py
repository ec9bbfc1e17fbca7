from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "POOLING_METHODS": "trine.modeling.pooling",
    "CrossEncoder": "trine.modeling.cross_encoder",
    "DecoderEmbedder": "trine.modeling.decoder",
    "FusionSettings": "trine.modeling.fusion",
    "LLMReranker": "trine.modeling.llm_reranker",
    "LayerwiseReranker": "trine.modeling.layerwise_reranker",
    "TriHeadModel": "trine.modeling.trihead",
    "colbert_vectors": "trine.modeling.heads",
    "lexical_matrix": "trine.modeling.heads",
    "lexical_token_weights": "trine.modeling.heads",
    "pool": "trine.modeling.pooling",
    "read_fusion": "trine.modeling.fusion",
    "special_token_ids": "trine.modeling.trihead",
    "write_fusion": "trine.modeling.fusion",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
