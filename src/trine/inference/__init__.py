from trine.inference.embedder import Embedder, M3Embedder
from trine.inference.encoder import Encoder
from trine.inference.reranker import Reranker
from trine.inference.result import EncodeResult

__all__ = ["EncodeResult", "Embedder", "Encoder", "M3Embedder", "Reranker"]
