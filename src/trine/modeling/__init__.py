from trine.modeling.cross_encoder import CrossEncoder
from trine.modeling.heads import colbert_vectors, lexical_matrix, lexical_token_weights
from trine.modeling.pooling import POOLING_METHODS, pool
from trine.modeling.trihead import TriHeadModel, special_token_ids

__all__ = [
    "POOLING_METHODS",
    "CrossEncoder",
    "TriHeadModel",
    "colbert_vectors",
    "lexical_matrix",
    "lexical_token_weights",
    "pool",
    "special_token_ids",
]
