"""trine: multi-function (dense + lexical + multi-vector) text embeddings."""

from trine.inference import Embedder, M3Embedder
from trine.modeling import TriHeadModel

__version__ = "0.1.0"
__all__ = ["Embedder", "M3Embedder", "TriHeadModel", "__version__"]
