"""A lexical head that starts out knowing term importance: the ``bm25`` head start.

A new lexical head (``Linear(hidden, 1)`` + ReLU over each token's final state) is fitted, before
any contrastive step, so that the weight of every token occurrence approximates the square root of
that token's BM25 weight in its text (IDF over a corpus, term-frequency saturation, length
normalisation). The lexical score of a query and a passage is the sum over shared tokens of the
product of their weights, so a token both hold contributes about the geometric mean of its BM25
weights in the two texts. The fit is ridge regression (closed form, float64) over the encoder's
token states; the checkpoint layout is unchanged (``sparse_linear.pt`` stays a ``Linear(hidden, 1)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from trine.modeling.heads import lexical_matrix

logger = logging.getLogger(__name__)


def bm25_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """Lucene's BM25 IDF ``log(1 + (N - df + 0.5) / (df + 0.5))``: positive for every df <= N."""
    df = np.asarray(df, dtype=np.float64)
    return np.log1p((n_docs - df + 0.5) / (df + 0.5))


def document_frequencies(token_ids: Sequence[Sequence[int]], vocab_size: int, skip: Sequence[int] = ()) -> np.ndarray:
    """How many of the tokenised texts hold each token id (vocabulary-sized), ``skip`` ids left at 0."""
    df = np.zeros(vocab_size, dtype=np.int64)
    for ids in token_ids:
        df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    df[np.asarray(list(skip), dtype=np.int64)] = 0
    return df


def text_lengths(token_ids: Sequence[Sequence[int]], skip: Sequence[int] = ()) -> list[int]:
    """Each text's BM25 length ``dl``: its tokens other than ``skip`` ids (padding and special tokens)."""
    skip_set = set(int(t) for t in skip)
    return [sum(1 for t in ids if int(t) not in skip_set) for ids in token_ids]


def mean_length(lengths: Sequence[int]) -> float:
    """BM25's ``avgdl`` (at least 1, so an all-special corpus divides by nothing smaller)."""
    return max(float(np.mean(lengths)), 1.0) if len(lengths) else 1.0


def bm25_targets(token_ids: Sequence[Sequence[int]], idf: np.ndarray, skip: Sequence[int] = (), *,
                 k1: float = 1.5, b: float = 0.75, avgdl: float | None = None) -> list[np.ndarray]:
    """Per text, per position: ``sqrt`` of the BM25 weight of that position's token in that text,
    ``idf * tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))`` (0 at ``skip`` ids); ``dl`` counts the
    text's tokens other than ``skip``, ``avgdl`` is their mean over the texts unless given (a corpus's
    mean, when ``token_ids`` are a batch scored against that corpus)."""
    skip_set = set(int(t) for t in skip)
    lengths = text_lengths(token_ids, skip)
    if avgdl is None:
        avgdl = mean_length(lengths)
    out = []
    for ids, dl in zip(token_ids, lengths):
        arr = np.asarray(ids, dtype=np.int64)
        values, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
        tf = counts[inverse].astype(np.float64)
        weight = idf[arr] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
        weight[np.isin(arr, list(skip_set))] = 0.0
        out.append(np.sqrt(weight))
    return out


def largest_bm25_weight(n_docs: int, k1: float = 1.5) -> float:
    """The largest BM25 weight a token can have in a corpus of ``n_docs`` texts, ``(k1 + 1) idf(df=1)``:
    dividing by it puts one shared token's contribution to a score at most 1, the scale of a cosine."""
    return (k1 + 1) * float(bm25_idf(np.array([1]), n_docs)[0])


class BM25Teacher:
    """BM25 scores of every (query, passage) pair of a batch, from the token ids the model sees: the
    teacher of ``sparse_bm25_distill_weight`` (:class:`trine.training.losses.BM25Distill`).

    Corpus statistics (document frequencies, ``avgdl``) come once from the training passages, tokenised
    as the model's; a batch's passages are scored with them. ``score(q, p) = sum over the distinct
    non-special tokens t of q of w_p(t)``, ``w_p(t)`` the BM25 weight of ``t`` in ``p`` (:func:`bm25_targets`
    squared), divided by :func:`largest_bm25_weight` as the ``bm25`` head start is: the fitted head's
    scores start on this scale, so the student and the teacher can share a temperature. Distinct query
    tokens count once because the lexical head's own score counts each shared token once (max pooling)."""

    def __init__(self, passage_ids: Sequence[Sequence[int]], vocab_size: int, skip: Sequence[int] = (), *,
                 k1: float = 1.5, b: float = 0.75):
        if not passage_ids:
            raise ValueError("the BM25 teacher needs the training passages' token ids, got none")
        self.vocab_size = int(vocab_size)
        self.skip = [int(t) for t in skip]
        self.k1, self.b = float(k1), float(b)
        self.n_docs = len(passage_ids)
        self.idf = bm25_idf(document_frequencies(passage_ids, self.vocab_size, self.skip), self.n_docs)
        self.avgdl = mean_length(text_lengths(passage_ids, self.skip))
        self.scale = largest_bm25_weight(self.n_docs, self.k1)

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], max_length: int, vocab_size: int,  # noqa: ANN001
                   skip: Sequence[int] = (), **options: float) -> BM25Teacher:
        """The teacher over ``texts`` tokenised as the collator does (truncated to ``max_length``)."""
        ids = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        return cls(ids, vocab_size, skip, **options)

    @torch.no_grad()
    def __call__(self, query_ids: torch.Tensor, passage_ids: torch.Tensor) -> torch.Tensor:
        """Queries x passages BM25 scores (float32, on the ids' device) of padded id matrices."""
        weights = bm25_targets(passage_ids.cpu().tolist(), self.idf, self.skip, k1=self.k1, b=self.b,
                               avgdl=self.avgdl)
        p_weights = torch.as_tensor(np.stack(weights) ** 2 / self.scale, dtype=torch.float32,
                                    device=passage_ids.device)
        skip = torch.tensor(self.skip, dtype=torch.long, device=query_ids.device)
        q_terms = (~torch.isin(query_ids, skip)).to(torch.float32)
        q_mat = lexical_matrix(q_terms, query_ids, self.vocab_size)  # 1 for each distinct query token
        return q_mat @ lexical_matrix(p_weights, passage_ids, self.vocab_size).T


@torch.no_grad()
def fit_lexical_head(
    model,  # noqa: ANN001  (a TriHeadModel; imported lazily by it)
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 32,
    max_tokens: int = 200_000,
    ridge: float = 1.0,
    seed: int = 0,
    k1: float = 1.5,
    b: float = 0.75,
) -> dict[str, float]:
    """Fit ``model.sparse_linear`` so that each token's weight approximates ``sqrt`` of its BM25 weight.

    The BM25 weight of a token in a text is Lucene's (``idf * tf (k1 + 1) / (tf + k1 (1 - b + b
    dl / avgdl))``, IDF over ``texts``, each truncated to ``max_length`` tokens as encoded),
    divided by its largest possible value ``(k1 + 1) * idf(df=1)``, so one shared token adds at
    most 1 to a lexical score, the scale of a cosine. Texts are encoded in a seeded random order
    until ``max_tokens`` token occurrences (special tokens excluded) are collected for the
    least-squares fit ``min ||H w + c - y||^2 + ridge ||w||^2``. Returns the fit's statistics: texts
    counted, texts encoded, token occurrences used and R^2.
    """
    if model.sparse_linear is None:
        raise ValueError("the model has no lexical head to fit (loaded with with_heads=False)")
    texts = [t for t in texts if t and t.strip()]
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if len(texts) < 2:
        raise ValueError(f"fitting the lexical head needs at least 2 non-empty texts, got {len(texts)}")
    tokenizer = model.tokenizer
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    special = model.unused_token_ids.tolist()
    idf = bm25_idf(document_frequencies(encoded, model.vocab_size, special), len(encoded))
    largest = largest_bm25_weight(len(encoded), k1)
    targets = [t / np.sqrt(largest) for t in bm25_targets(encoded, idf, special, k1=k1, b=b)]

    order = np.random.default_rng(seed).permutation(len(encoded)).tolist()
    special_set = set(special)
    chosen, count = [], 0
    for i in order:  # enough texts for max_tokens, then shortest first (less padding)
        if count >= max_tokens:
            break
        chosen.append(i)
        count += sum(1 for t in encoded[i] if t not in special_set)
    chosen.sort(key=lambda i: len(encoded[i]))
    device = next(model.backbone.parameters()).device
    was_training = model.training
    model.eval()
    dim = model.hidden_size + 1
    gram = np.zeros((dim, dim), dtype=np.float64)
    moment = np.zeros(dim, dtype=np.float64)
    y_sum = y_sq = 0.0
    used = 0
    special_t = torch.tensor(special, dtype=torch.long)
    try:
        for start in range(0, len(chosen), batch_size):
            rows = chosen[start : start + batch_size]
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
            ids, mask = padded["input_ids"], padded["attention_mask"]
            hidden = model.backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            take = mask.bool() & ~torch.isin(ids, special_t)
            h = hidden[take.to(device)].to(torch.float64).cpu().numpy()
            y = np.concatenate([targets[i][take[r, : len(encoded[i])].numpy()] for r, i in enumerate(rows)])
            x = np.concatenate([h, np.ones((len(h), 1))], axis=1)
            gram += x.T @ x
            moment += x.T @ y
            y_sum += float(y.sum())
            y_sq += float((y * y).sum())
            used += len(y)
    finally:
        model.train(was_training)
    if used < dim and ridge <= 0:
        raise ValueError(f"only {used} token occurrences to fit {dim} parameters without ridge: give more texts")
    reg = np.full(dim, float(ridge))
    reg[-1] = 0.0  # the bias is not shrunk
    solution = np.linalg.solve(gram + np.diag(reg), moment)
    sse = y_sq - 2 * solution @ moment + solution @ gram @ solution
    sst = y_sq - y_sum * y_sum / used
    linear = model.sparse_linear
    linear.weight.copy_(torch.as_tensor(solution[:-1], dtype=linear.weight.dtype).view(1, -1))
    linear.bias.fill_(float(solution[-1]))
    stats = {"texts": len(encoded), "encoded": len(chosen), "tokens": used,
             "r2": float(1 - sse / sst) if sst > 0 else math.nan}
    logger.info("lexical head fitted to BM25 term weights over %d texts (%d encoded, %d token occurrences): R^2 %.3f",
                len(encoded), len(chosen), used, stats["r2"])
    return stats
