from trine.inference.embedder import Embedder, M3Embedder
from trine.inference.reranker import Reranker

__all__ = ["Embedder", "M3Embedder", "Reranker"]
