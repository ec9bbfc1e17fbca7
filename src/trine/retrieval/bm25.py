"""BM25 over raw texts, through the ``bm25s`` package: the classical baseline beside the model's modes.

Texts are tokenised by ``bm25s.tokenize``: lower-cased, split on ``\\b\\w\\w+\\b`` (words of two or more
word characters), English stop-words removed (bm25s's list) and each word reduced by the English
Snowball stemmer (PyStemmer). Scores are bm25s's own with its defaults: ``method="lucene"``,
``k1=1.5``, ``b=0.75``, that is ``sum over query terms of idf * tf / (tf + k1 (1 - b + b dl / avgdl))``
with ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` (Lucene's form, without the constant factor
``k1 + 1``). A query word the corpus never contains scores nothing.

The index holds ``"text"`` documents (plain strings; queries are strings too), so it serves
evaluation and anything that calls the :class:`~trine.retrieval.Index` protocol, but it is not one
of :class:`~trine.retrieval.HybridRetriever`'s encoded modes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from trine.retrieval.base import (
    SearchResult,
    atomic_folder,
    check_ids,
    check_unique,
    read_ids,
    read_meta,
    score_rows,
    search_positive,
    write_ids,
    write_meta,
)
from trine.retrieval.protocol import register_index

#: bm25s's scoring variant and parameters (its defaults), the Snowball language and stop-word list
DEFAULTS: dict[str, Any] = {"method": "lucene", "k1": 1.5, "b": 0.75, "stemmer": "english", "stopwords": "english"}


def _texts(docs: Any, what: str) -> list[str]:
    if isinstance(docs, str) or not isinstance(docs, Sequence):
        raise TypeError(f"{what} must be a sequence of strings, got {type(docs).__name__}")
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise TypeError(f"{what}[{bad}] is a {type(docs[bad]).__name__}, not a string")
    return list(docs)



def _bm25s() -> Any:
    """The bm25s module. It sets its own logger to DEBUG on import, so every index build would print
    under any logging handler; its records follow the level the user's logging config gives instead."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


class BM25Index:
    """BM25 (bm25s) over plain-text documents; queries are plain texts.

    ``BM25Index.build(texts, ids)`` tokenises and indexes; ``add`` re-indexes the whole corpus (document
    frequencies change with every document), so add in large batches. ``save`` writes the texts and
    the options; ``load`` re-indexes them (bm25s indexes about a hundred thousand short texts a second).
    """

    representation = "text"

    def __init__(self, *, method: str = DEFAULTS["method"], k1: float = DEFAULTS["k1"], b: float = DEFAULTS["b"],
                 stemmer: str | None = DEFAULTS["stemmer"], stopwords: str | None = DEFAULTS["stopwords"]):
        """An empty index to :meth:`add` to. ``stemmer``: a Snowball language (PyStemmer) or None;
        ``stopwords``: a bm25s stop-word list name (``"english"``) or None."""
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.options: dict[str, Any] = {"method": method, "k1": float(k1), "b": float(b), "stemmer": stemmer,
                                        "stopwords": stopwords}
        self._stemmer = None
        if stemmer is not None:
            import Stemmer

            try:
                self._stemmer = Stemmer.Stemmer(stemmer)
            except KeyError:
                raise ValueError(f"stemmer {stemmer!r} is not a Snowball language; PyStemmer knows "
                                 f"{Stemmer.algorithms()}") from None
        self._ids: list[str] = []
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        self.model = None  # the bm25s.BM25 over self._tokens (None while empty)

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text's terms as the index sees them (lower-cased, stop-words out, stemmed)."""
        bm25s = _bm25s()

        texts = _texts(texts, "texts")
        if not texts:
            return []
        return bm25s.tokenize(texts, stopwords=self.options["stopwords"], stemmer=self._stemmer,
                              return_ids=False, show_progress=False)

    @classmethod
    def build(cls, docs: Sequence[str], /, ids: Sequence[str] | None = None, **options: Any) -> BM25Index:
        index = cls(**options)
        index.add(docs, ids)
        return index

    def add(self, docs: Sequence[str], /, ids: Sequence[str] | None = None) -> None:
        """Append documents as new rows (ids default to the row numbers) and re-index all; on bad input
        nothing changes."""
        bm25s = _bm25s()

        docs = _texts(docs, "docs")
        new_ids = check_ids(ids, len(docs), start=len(self._ids))
        check_unique(self._ids + new_ids)
        if not docs:
            return
        tokens = self._tokens + self.tokenize(docs)
        o = self.options
        model = bm25s.BM25(method=o["method"], k1=o["k1"], b=o["b"])
        model.index(tokens, show_progress=False)
        self.model, self._tokens = model, tokens
        self.texts.extend(docs)
        self._ids.extend(new_ids)

    # ------------------------------------------------------------------ scoring
    def score_all(self, query: str) -> np.ndarray:
        """bm25s's score of ``query`` for every document (float64, length ``len(self)``)."""
        (terms,) = self.tokenize([query])
        known = [t for t in terms if t in self.model.vocab_dict] if self.model is not None else []
        if not known:  # bm25s's get_scores needs at least one term
            return np.zeros(len(self._ids), dtype=np.float64)
        return np.asarray(self.model.get_scores(known), dtype=np.float64)

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """Each query's ``k`` best documents among those sharing a term with it (score > 0)."""
        return search_positive(self.score_all, _texts(queries, "queries"), k)

    def score(self, queries: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """Exact scores of query i with rows[i] (queries x m); -inf where rows is -1."""
        return score_rows(self.score_all, _texts(queries, "queries"), rows)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``index.json`` (kind ``bm25`` and the options), ``ids.json`` and ``texts.json``; all or nothing."""
        with atomic_folder(path, overwrite=overwrite) as tmp:
            write_ids(tmp, self._ids)
            with open(os.path.join(tmp, "texts.json"), "w") as f:
                json.dump(self.texts, f)
            write_meta(tmp, "bm25", count=len(self._ids), options=self.options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BM25Index:
        meta = read_meta(path, "bm25")
        folder = os.fspath(path)
        ids = read_ids(folder, meta["count"])
        texts_path = os.path.join(folder, "texts.json")
        with open(texts_path) as f:
            texts = json.load(f)
        if not isinstance(texts, list) or len(texts) != meta["count"]:
            raise ValueError(f"{texts_path}: expected a list of {meta['count']} texts")
        index = cls(**meta["options"])
        index.add(texts, ids)
        return index


register_index("bm25", BM25Index)
