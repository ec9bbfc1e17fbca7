from trine.inference.embedder import Embedder, M3Embedder

__all__ = ["Embedder", "M3Embedder"]
