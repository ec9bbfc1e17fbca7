from trine.modeling.cross_encoder import CrossEncoder
from trine.modeling.decoder import DecoderEmbedder
from trine.modeling.fusion import FusionSettings, read_fusion, write_fusion
from trine.modeling.heads import colbert_vectors, lexical_matrix, lexical_token_weights
from trine.modeling.layerwise_reranker import LayerwiseReranker
from trine.modeling.llm_reranker import LLMReranker
from trine.modeling.pooling import POOLING_METHODS, pool
from trine.modeling.trihead import TriHeadModel, special_token_ids

__all__ = [
    "POOLING_METHODS",
    "CrossEncoder",
    "DecoderEmbedder",
    "FusionSettings",
    "LLMReranker",
    "LayerwiseReranker",
    "TriHeadModel",
    "colbert_vectors",
    "lexical_matrix",
    "lexical_token_weights",
    "pool",
    "read_fusion",
    "special_token_ids",
    "write_fusion",
]
