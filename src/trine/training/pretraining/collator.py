"""RetroMAE's masks: whole-word samples for the encoder and for every decoder row."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def whole_word_sample(word_index: np.ndarray, probability: float, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` independent whole-word samples over one text: bool (rows x length), True = chosen.

    ``word_index`` gives each token's word (-1: a special or padding token, never chosen). Words
    are taken in a random order until about ``probability`` of the word tokens are covered (a
    word is taken if the count before it plus half its length stays within the target), at
    least one word per row; the pieces of a word are always chosen together.
    """
    valid = word_index >= 0
    out = np.zeros((rows, word_index.shape[0]), dtype=bool)
    if not valid.any():
        return out
    _, slot = np.unique(word_index[valid], return_inverse=True)
    lengths = np.bincount(slot)
    target = max(1, round(int(valid.sum()) * probability))
    order = np.argsort(rng.random((rows, lengths.shape[0])), axis=1)
    taken_lengths = lengths[order]
    before = np.cumsum(taken_lengths, axis=1) - taken_lengths
    take = before + taken_lengths / 2 <= target
    take[:, 0] = True
    chosen = np.zeros_like(take)
    np.put_along_axis(chosen, order, take, axis=1)
    out[:, valid] = chosen[:, slot]
    return out


class RetroMAECollator:
    """Tokenises a batch of texts and draws the masks (see :class:`trine.modeling.retromae.RetroMAEModel`).

    Returns ``encoder_input_ids`` (whole words masked at ``encoder_mlm_probability``: 80%
    ``[MASK]``, 10% a random token, 10% unchanged), ``attention_mask``, ``encoder_labels``
    (original ids at the masked positions, -100 elsewhere), ``decoder_input_ids`` (the original
    ids), ``decoder_visible`` (batch x length x length, bool: row i may attend to slot j; each row
    hides a fresh whole-word sample at ``decoder_mlm_probability`` and its own position, slot 0
    (the sentence vector) is always visible, padding never) and ``decoder_labels`` (every
    non-special token; -100 at special tokens and padding).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int = 512,
                 encoder_mlm_probability: float = 0.3, decoder_mlm_probability: float = 0.5, seed: int = 0,
                 pad_to_multiple_of: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("RetroMAE needs a fast tokenizer (tokenizer.json) to find whole words")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.encoder_mlm_probability = encoder_mlm_probability
        self.decoder_mlm_probability = decoder_mlm_probability
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, item["epoch"], item["rank"], item["batch"]])
        return self.build(item["texts"], rng)

    def build(self, texts: list[str], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        enc = tok(texts, truncation=True, max_length=self.max_seq_length, return_special_tokens_mask=True)
        lengths = [len(ids) for ids in enc["input_ids"]]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(texts)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = np.full((b, length), pad_id, dtype=np.int64)
        attention = np.zeros((b, length), dtype=np.int64)
        encoder_ids = ids.copy()
        encoder_labels = np.full((b, length), -100, dtype=np.int64)
        decoder_labels = np.full((b, length), -100, dtype=np.int64)
        visible = np.zeros((b, length, length), dtype=bool)
        for i in range(b):
            n = lengths[i]
            row = np.asarray(enc["input_ids"][i], dtype=np.int64)
            special = np.asarray(enc["special_tokens_mask"][i], dtype=bool)
            words = np.array([-1 if w is None else w for w in enc.word_ids(i)], dtype=np.int64)
            words[special] = -1
            if not special[0]:
                raise ValueError("RetroMAE needs a tokenizer that starts every text with a special (CLS) token")
            ids[i, :n] = row
            attention[i, :n] = 1

            masked = whole_word_sample(words, self.encoder_mlm_probability, 1, rng)[0]
            encoder_labels[i, :n][masked] = row[masked]
            replaced = row.copy()
            draw = rng.random(n)
            replaced[masked & (draw < 0.8)] = tok.mask_token_id
            swap = masked & (draw >= 0.8) & (draw < 0.9)
            replaced[swap] = rng.integers(len(tok), size=int(swap.sum()))
            encoder_ids[i, :n] = replaced

            decoder_labels[i, :n][~special] = row[~special]
            hidden = whole_word_sample(words, self.decoder_mlm_probability, n, rng)
            see = ~hidden
            see[np.arange(n), np.arange(n)] = False  # a row never sees the token it reconstructs
            see[:, 0] = True  # the sentence vector
            visible[i, :n, :n] = see
            visible[i, n:, 0] = True  # padding rows (no label) attend to the sentence vector only
        return {
            "encoder_input_ids": torch.from_numpy(encoder_ids),
            "attention_mask": torch.from_numpy(attention),
            "encoder_labels": torch.from_numpy(encoder_labels),
            "decoder_input_ids": torch.from_numpy(ids),
            "decoder_visible": torch.from_numpy(visible),
            "decoder_labels": torch.from_numpy(decoder_labels),
        }
