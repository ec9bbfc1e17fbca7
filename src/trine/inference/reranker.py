"""``Reranker``: reranker scores for (query, passage) pairs (FlagEmbedding's ``FlagReranker``, ``FlagLLMReranker``,
``LayerWiseFlagLLMReranker``).

It runs on the same machinery as the embedders: one length-sorted batching routine with a
token budget and out-of-memory back-off (:func:`trine.inference.batching.run_batched`), and the
one device pool (:class:`trine.inference.pool.DeviceRunner`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from trine.data.text import check_template, format_instruction
from trine.errors import NonFiniteOutputError, OptionError
from trine.inference.batching import pad_batch, run_batched
from trine.inference.pool import (
    DeviceRunner,
    check_max_length,
    check_positive_int,
    check_token_budget,
    resolve_devices,
    resolve_dtype,
)
from trine.modeling.families import resolve_family

#: an instruction left unset: the model family's default (none for a cross-encoder; FlagLLMReranker's "A: " /
#: "B: " for an LLM reranker); None: no instruction
FAMILY_DEFAULT: Any = type("FamilyDefault", (), {"__repr__": lambda self: "FAMILY_DEFAULT"})()


def _format(instruction: str | None, instruction_format: str, text: str) -> str:
    if instruction is None:
        return text
    return format_instruction(instruction_format, instruction, text)


class Reranker(DeviceRunner):
    """Relevance scores from a reranker: a cross-encoder, or a decoder-only LLM reranker (the logit of "Yes"
    after ``prompt``, FlagEmbedding's ``FlagLLMReranker``). ``model_family``: a registered reranker family
    (``cross-encoder``, ``llm-reranker``); unset, the folder says (:func:`trine.modeling.families.resolve_family`).

    ``query_max_length`` (default 3/4 of ``max_length``) caps the query's tokens; the passage
    gets the rest of ``max_length`` (special tokens included). ``normalize`` applies a sigmoid.
    Instructions: ``query_instruction_for_rerank`` with ``query_instruction_format`` (and the
    passage equivalents), as FlagEmbedding; unset, the family's defaults. ``prompt``: an LLM reranker's prompt
    (unset: the one its folder records, else FlagEmbedding's). ``cutoff_layers``: a layer-wise reranker's
    (``llm-reranker-layerwise``, FlagEmbedding's ``LayerWiseFlagLLMReranker``) layer or layers to score at (unset: its
    last layer); several layers give one score list per layer. Other rerankers refuse it. ``model_name_or_path``
    may be a Hugging Face Hub id (``org/name``, ``org/name@revision``; ``revision``, ``cache_dir``, ``token``), as
    :func:`trine.modeling.loading.resolve_model` says.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | nn.Module,
        *,
        model_family: str | None = None,
        prompt: str | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
        query_instruction_for_rerank: str | None = FAMILY_DEFAULT,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = FAMILY_DEFAULT,
        passage_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool = False,
        max_tokens_per_batch: int | Literal["auto"] | None = "auto",
        show_progress: bool = True,
        trust_remote_code: bool = False,
        cutoff_layers: int | Sequence[int] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ):
        check_token_budget(max_tokens_per_batch)
        self.devices = resolve_devices(devices)
        self.dtype = resolve_dtype(use_fp16, use_bf16)
        if isinstance(model_name_or_path, nn.Module):
            model = model_name_or_path
        else:
            # a folder, or a Hub id fetched into the Hugging Face cache; the family is the one it records or shows
            family, path = resolve_family(model_name_or_path, "reranker", model_family=model_family,
                                          revision=revision, cache_dir=cache_dir, token=token, what="reranker")
            if family.load is None:
                raise OptionError(f"model_family: {family.name!r} has no inference loader")
            model = family.load(path, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.model = model
        self._check_prompt(prompt)
        self._check_cutoff_layers(cutoff_layers)
        self.cutoff_layers = cutoff_layers
        if query_instruction_for_rerank is FAMILY_DEFAULT:
            query_instruction_for_rerank = getattr(model, "default_query_instruction", None)
        if passage_instruction_for_rerank is FAMILY_DEFAULT:
            passage_instruction_for_rerank = getattr(model, "default_passage_instruction", None)
        batch_size = check_positive_int("batch_size", batch_size)
        max_length = check_max_length("max_length", max_length, model.max_positions)
        if query_max_length is not None:
            query_max_length = check_positive_int("query_max_length", query_max_length)
        self.model.eval()
        self.tokenizer = model.tokenizer
        self.prompt = prompt
        self.query_instruction_for_rerank = query_instruction_for_rerank
        self.query_instruction_format = check_template(query_instruction_format, "query_instruction_format")
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = check_template(passage_instruction_format, "passage_instruction_format")
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.max_length = max_length
        self.normalize = normalize
        self.max_tokens_per_batch = max_tokens_per_batch
        self.show_progress = show_progress
        self._pool = None
        if len(self.devices) == 1:
            self._move_to(self.devices[0])

    def _check_prompt(self, prompt: str | None) -> None:
        if prompt is not None and not hasattr(self.model, "prompt"):
            raise OptionError(f"prompt: a {type(self.model).__name__} takes no prompt (an LLM reranker's option)")
        if prompt is not None and not isinstance(prompt, str):
            raise OptionError(f"prompt: must be a string, got {type(prompt).__name__}")

    def _check_cutoff_layers(self, cutoff_layers: int | Sequence[int] | None) -> None:
        if cutoff_layers is None:
            return
        if not hasattr(self.model, "check_cutoff_layers"):
            raise OptionError(f"cutoff_layers: a {type(self.model).__name__} scores after its last layer only "
                              "(cutoff_layers is a layer-wise reranker's option, model_family llm-reranker-layerwise)")
        self.model.check_cutoff_layers(cutoff_layers)

    @torch.inference_mode()
    def _score_chunk(
        self, pairs: list[tuple[str, str]], *, device: str, batch_size: int, query_max_length: int, max_length: int,
        prompt: str | None = None, cutoff_layers: list[int] | None = None,
    ) -> list[Any]:
        # an LLM reranker's prompt, when one is given (else the model's own)
        extra = {"prompts": [prompt] * len(pairs)} if prompt is not None else {}
        ids, types = self.model.tokenize_pairs([p[0] for p in pairs], [p[1] for p in pairs],
                                               query_max_length=query_max_length, max_length=max_length, **extra)
        pad_id = self.tokenizer.pad_token_id

        def run(idx: np.ndarray) -> list[float]:
            batch = pad_batch([ids[i] for i in idx], pad_id, device, token_types=[types[i] for i in idx])
            layers = {} if cutoff_layers is None else {"cutoff_layers": cutoff_layers}
            logits = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **layers)
            # a layer-wise reranker's (layers, pairs) scores become one list of per-layer scores per pair
            return logits.float().cpu().t().tolist() if cutoff_layers is not None else logits.float().cpu().tolist()

        return run_batched([len(x) for x in ids], batch_size, run, max_tokens=self._max_tokens(device),
                           desc="rerank", show_progress=self.show_progress)

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        prompt: str | None = None,
        cutoff_layers: int | Sequence[int] | None = None,
    ) -> list[float] | list[list[float]]:
        """One score per pair (a list, also for a single pair, as FlagEmbedding); ``prompt``: an LLM reranker's
        prompt for this call (unset: the reranker's). ``cutoff_layers`` (a layer-wise reranker's; unset: the
        reranker's, else its last layer): the layer(s) to score at; as FlagEmbedding, one layer (an int or a list of
        one) gives one list of scores, several give one list per layer, in the order given."""
        single = len(sentence_pairs) == 2 and isinstance(sentence_pairs[0], str)
        pairs = [tuple(sentence_pairs)] if single else [tuple(p) for p in sentence_pairs]
        for i, p in enumerate(pairs):
            if len(p) != 2 or not all(isinstance(t, str) for t in p):
                raise TypeError(f"sentence_pairs[{i}] is not a (query, passage) pair of strings")
        if not pairs:
            return []
        # None is "the default"; 0 or a negative number is an error (never silently the default)
        max_length = check_max_length("max_length", self.max_length if max_length is None else max_length,
                                      self.model.max_positions)
        if query_max_length is None:
            query_max_length = self.query_max_length or max_length * 3 // 4
        query_max_length = check_positive_int("query_max_length", query_max_length)
        batch_size = check_positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        pairs = [
            (_format(self.query_instruction_for_rerank, self.query_instruction_format, q),
             _format(self.passage_instruction_for_rerank, self.passage_instruction_format, p))
            for q, p in pairs
        ]
        self._check_prompt(prompt)
        cutoff_layers = self.cutoff_layers if cutoff_layers is None else cutoff_layers
        self._check_cutoff_layers(cutoff_layers)
        layers = None if cutoff_layers is None else self.model.check_cutoff_layers(cutoff_layers)
        chunks = self._run("_score_chunk", pairs, batch_size=batch_size, query_max_length=query_max_length,
                           max_length=max_length, prompt=self.prompt if prompt is None else prompt,
                           cutoff_layers=layers)
        scores = np.array([s for chunk in chunks for s in chunk], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(scores).reshape(len(pairs), -1).all(axis=1))
        if bad.size:  # finite weights (checked at load) overflowing, e.g. in float16: never a score
            config = getattr(getattr(self.model, "model", None), "config", None)
            name = getattr(config, "_name_or_path", None) or type(self.model).__name__
            dtype = str(self.dtype).removeprefix("torch.")
            raise NonFiniteOutputError(f"{name}: the reranker gave a NaN or infinite score ({dtype}) for {bad.size} of "
                                       f"{len(pairs)} pairs, the first pair {bad[0]}"
                                       + (": score in float32 (no --fp16) or bfloat16"
                                          if self.dtype == torch.float16 else ""))
        if normalize if normalize is not None else self.normalize:
            scores = 1.0 / (1.0 + np.exp(-scores))
        if layers is None or len(layers) == 1:
            return scores.reshape(-1).tolist()
        return scores.T.tolist()

    def rerank(
        self, query: str, passages: Sequence[str], *, top_k: int | None = None, **kwargs: Any
    ) -> list[tuple[int, float]]:
        """(index into ``passages``, score) pairs, best first."""
        scores = self.compute_score([(query, p) for p in passages], **kwargs)
        if scores and isinstance(scores[0], list):
            raise OptionError("cutoff_layers: rerank orders passages by one score; name one layer")
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [(i, scores[i]) for i in order[:top_k]]
