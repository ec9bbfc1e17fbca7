from trine.inference.embedder import Embedder, M3Embedder
from trine.inference.encoder import Encoder
from trine.inference.reranker import Reranker
from trine.inference.result import EncodeResult
from trine.inference.shards import EncodedCorpus, encode_corpus, load_encoded

__all__ = ["EncodeResult", "EncodedCorpus", "Embedder", "Encoder", "M3Embedder", "Reranker", "encode_corpus",
           "load_encoded"]
