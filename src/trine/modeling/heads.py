"""The lexical (sparse) and multi-vector (ColBERT) heads.

Neither function ever builds a (batch x length x vocabulary) tensor: per-token lexical weights
stay (batch x length) and are reduced into (batch x vocabulary) with ``scatter_reduce(amax)``
only when a caller asks for the vocabulary-space matrix (training losses, brute-force scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lexical_token_weights(
    sparse_linear: torch.nn.Linear,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    unused_token_ids: torch.Tensor,
) -> torch.Tensor:
    """ReLU(W_lex h) per token (batch x length), zero at special tokens (cls, eos, pad, unk...).

    Zeroing is out of place, so autograd works (FlagEmbedding's in-place ``*= 0`` does not).
    """
    weights = torch.relu(sparse_linear(hidden)).squeeze(-1)
    special = torch.isin(input_ids, unused_token_ids)
    return torch.where(special, torch.zeros_like(weights), weights)


def lexical_matrix(token_weights: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Max weight per token id: (batch x length) -> (batch x vocabulary), differentiable."""
    out = token_weights.new_zeros(token_weights.size(0), vocab_size)
    return out.scatter_reduce(1, input_ids, token_weights, reduce="amax", include_self=True)


def colbert_vectors(
    colbert_linear: torch.nn.Linear,
    hidden: torch.Tensor,
    token_mask: torch.Tensor,
    normalize: bool,
) -> torch.Tensor:
    """W_mul h over the tokens after the first; masked rows are zero vectors.

    ``token_mask`` (batch x length) says which positions carry a multi-vector; position 0
    (the CLS token) is always dropped.
    """
    vecs = colbert_linear(hidden[:, 1:]) * token_mask[:, 1:].unsqueeze(-1).to(hidden.dtype)
    return F.normalize(vecs, dim=-1) if normalize else vecs
