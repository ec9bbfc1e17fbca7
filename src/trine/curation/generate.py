"""`trine generate-queries`: synthetic training pairs, queries written by a language model for passages.

Any Hugging Face causal LM (its chat template when it has one, the plain prompt otherwise) or
sequence-to-sequence model writes ``num_queries`` queries per passage from a prompt template with a
``{passage}`` placeholder (``{title}`` too, where the passages have titles). Generation runs in
batches (left padding for decoders) on one device or over trine's device pool, seeded per batch (the
same options, batch size and devices give the same queries).

Each passage's queries are cleaned (first line, no ``Query:`` label or quotes), de-duplicated
(case-folded, whitespace collapsed) and dropped when they copy the passage (contained in it, or most
of their word trigrams are). Rows are FlagEmbedding training records, ``{"query", "pos": [passage],
"generator": {...}}``, the generator naming the model, the prompt's SHA-256 and the sampling options.
With a reference scorer the rows then go through `trine filter`'s consistency filter
(:func:`filter_pairs`: the passage must rank in the top-k for its generated query, and/or score at
least ``min_score``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trine.curation.common import atomic_jsonl, check_output, write_row
from trine.curation.filtering import FilterSummary, filter_pairs, normalise
from trine.data.corpus import text_of
from trine.data.reader import DataError, json_lines
from trine.data.text import text_problem
from trine.errors import InputError, OptionError
from trine.inference.pool import DeviceRunner, check_positive_int, resolve_devices, resolve_dtype
from trine.io import check_distinct, remove_stale_temps, temp_prefix
from trine.modeling.loading import load_tokenizer, resolve_model
from trine.progress import bar as progress_bar

# Of the prompts tried with SmolLM2-135M-Instruct (benchmarks/generate_queries_smollm2.py), the one whose pairs
# the consistency filter kept most often.
DEFAULT_PROMPT = ("Write one short search query that a user could type to find the following passage. "
                  "Reply with the query only.\n\nPassage: {passage}")
_MARKER = re.compile(r"^\s*(?:#?\d+\s*[.):]\s+|[-*•]\s+)")  # a list item's number or bullet
_LABEL = re.compile(r"^\s*(?:search\s*)?(?:query|question)\s*\d*\s*[:\-]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\w+")
COPY_NGRAM = 3  # word n-grams compared between a query and its passage


@dataclass
class Passage:
    text: str
    line: int
    id: str | None = None
    title: str | None = None


@dataclass
class GenerateSummary:
    passages: int = 0
    generated: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "duplicate": 0, "copies_passage": 0})
    seconds: float = 0.0
    filtered: FilterSummary | None = None

    def lines(self) -> list[str]:
        drops = ", ".join(f"{k} {v}" for k, v in self.dropped.items())
        out = [f"passages {self.passages}: {self.generated} queries generated, {self.written} pairs kept "
               f"(dropped: {drops}) in {self.seconds:.1f} s"]
        if self.filtered is not None:
            out += ["consistency filter: " + line for line in self.filtered.lines()]
        return out


def read_passages(path: str) -> list[Passage]:
    """Passages: JSONL of ``{"text": str, "_id"?: str|int, "title"?: str}`` (other fields ignored,
    as in a BEIR corpus); every problem raised at once as ``file:line: field: message``."""
    problems: list[str] = []
    passages = []
    for number, obj in json_lines(path, problems):
        where = f"{path}:{number}"
        text, problem = text_of(obj, record_name="passage")
        if problem:
            problems.append(f"{where}: {problem}")
        pid = obj.get("_id")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
            problems.append(f"{where}: _id: must be a string or an integer, got {type(pid).__name__}")
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            problems.append(f"{where}: title: must be a string, got {type(title).__name__}")
        elif title and title.strip() and text_problem(title):  # a blank title is no title
            problems.append(f"{where}: title: {text_problem(title)}")
        if text is not None:
            passages.append(Passage(text, number, None if pid is None else str(pid),
                                    title if isinstance(title, str) else None))
    if problems:
        raise DataError(problems)
    if not passages:
        raise DataError([f"{path}: no passages"])
    return passages


def load_prompt(prompt: str | None = None, prompt_file: str | None = None) -> str:
    """The prompt template: ``prompt``, the text of ``prompt_file``, or :data:`DEFAULT_PROMPT`; it must
    hold ``{passage}`` (and may hold ``{title}``)."""
    if prompt is not None and prompt_file is not None:
        raise OptionError("give --prompt or --prompt_file, not both")
    where = "--prompt"
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except FileNotFoundError:
            raise InputError(f"{prompt_file}: prompt_file: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{prompt_file}: prompt_file: cannot read: {err}") from None
        where = prompt_file
    template = DEFAULT_PROMPT if prompt is None else prompt
    if "{passage}" not in template:
        raise OptionError(f"{where}: the prompt template has no {{passage}} placeholder")
    return template


def fill_prompt(template: str, passage: Passage) -> str:
    # replace, not str.format: a template may hold other braces (JSON examples)
    return template.replace("{passage}", passage.text).replace("{title}", passage.title or "")


def clean_query(text: str) -> str:
    """The query in a model's reply: its first non-empty line without a list marker, ``Query:`` label or quotes.
    A first line that only leads in to the query (it ends with a colon: "Here is a query:") gives the next
    line, or nothing (the reply is dropped as empty) when the reply stops there; code-fence lines and lines
    without a letter or digit are skipped."""
    # no query in a code fence or a line without a letter or digit (a lone backtick, a dash)
    lines = [ln.strip() for ln in text.splitlines()
             if any(c.isalnum() for c in ln) and not ln.strip().startswith("```")]
    while lines and _LABEL.sub("", _MARKER.sub("", lines[0])).strip().endswith(":"):
        lines = lines[1:]
    line = lines[0] if lines else ""
    line = _LABEL.sub("", _MARKER.sub("", line)).strip()
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    return line


def copied_share(query: str, passage: str, n: int = COPY_NGRAM) -> float:
    """Share of the query's word n-grams (case-folded, punctuation ignored) found in the passage: 1.0 for a
    query lifted from the passage; 0.0 for a query shorter than ``n`` words (exact containment covers those)."""
    q, p = _WORD.findall(query.casefold()), _WORD.findall(passage.casefold())
    if len(q) < n:
        return 0.0
    grams = {tuple(p[i : i + n]) for i in range(len(p) - n + 1)}
    own = [tuple(q[i : i + n]) for i in range(len(q) - n + 1)]
    return sum(g in grams for g in own) / len(own)


def prompt_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


class QueryGenerator(DeviceRunner):
    """A causal or sequence-to-sequence LM that writes queries for passages.

    ``gguf_file``: a GGUF file inside ``model_name_or_path`` (de-quantised by transformers on load;
    save it once with ``save_pretrained`` and load that folder to skip the work next time)."""

    def __init__(self, model_name_or_path: str, *, devices: str | Sequence[str] | None = None,
                 use_fp16: bool = False, batch_size: int = 8, passage_max_len: int = 256,
                 gguf_file: str | None = None, use_chat_template: bool | None = None, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, token: str | bool | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        self.batch_size = check_positive_int("batch_size", batch_size)
        self.passage_max_len = check_positive_int("passage_max_len", passage_max_len)
        self.devices = resolve_devices(devices)
        self.dtype = resolve_dtype(use_fp16, False)
        # a folder, or a Hub id fetched into the Hugging Face cache (with the GGUF file when one is named); the
        # outputs record the model as named
        self.model_name = model_name_or_path
        model_name_or_path = resolve_model(model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                           extra_files=[gguf_file] if gguf_file else ())
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        config = AutoConfig.from_pretrained(model_name_or_path, **extra)
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        self.tokenizer = load_tokenizer(model_name_or_path, **extra)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template and (self.seq2seq or not has_template):
            raise OptionError(f"{model_name_or_path}: use_chat_template: the model has no chat template"
                              + (" (a sequence-to-sequence model takes the plain prompt)" if self.seq2seq else ""))
        self.chat = has_template and not self.seq2seq if use_chat_template is None else bool(use_chat_template)
        if not self.seq2seq:
            self.tokenizer.padding_side = "left"  # batched decoding continues every row from its last token
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise OptionError(f"{model_name_or_path}: the tokenizer has neither a pad nor an end-of-text token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = cls.from_pretrained(model_name_or_path, **extra).eval()
        if len(self.devices) == 1:
            self._move_to(self.devices[0])

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "kind": "seq2seq" if self.seq2seq else "causal", "chat_template": self.chat}

    def _shorten(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.passage_max_len else self.tokenizer.decode(ids[: self.passage_max_len])

    def prompt_text(self, template: str, passage: Passage) -> str:
        """What the model reads for one passage (the chat template applied where it is used)."""
        filled = fill_prompt(template, Passage(self._shorten(passage.text), passage.line, passage.id, passage.title))
        if not self.chat:
            return filled
        return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], *, num_queries: int = 3, temperature: float = 0.7,
                 top_p: float = 0.95, max_new_tokens: int = 32, seed: int = 42,
                 show_progress: bool = False) -> list[list[str]]:
        """``num_queries`` raw replies per prompt, in prompt order (batches seeded by their position)."""
        check_positive_int("num_queries", num_queries)
        check_positive_int("max_new_tokens", max_new_tokens)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature == 0 and num_queries > 1:
            raise ValueError("temperature 0 is greedy decoding, one query per passage; sample (temperature > 0) "
                             "for num_queries > 1")
        items = list(enumerate(prompts))
        options = dict(num_queries=num_queries, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                       seed=seed, show_progress=show_progress and len(self.devices) == 1)
        return [replies for chunk in self._run("_generate_on", items, **options) for replies in chunk]

    def _generate_on(self, items: list[tuple[int, str]], *, device: str, num_queries: int, temperature: float,
                     top_p: float, max_new_tokens: int, seed: int, show_progress: bool) -> list[list[str]]:
        out: list[list[str]] = []
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False}
        bar = progress_bar(total=len(items), desc="generate", unit="passage", disable=not show_progress)
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            enc = self.tokenizer([p for _, p in batch], padding=True, return_tensors="pt", return_token_type_ids=False,
                                 add_special_tokens=not self.chat).to(device)
            torch.manual_seed(seed + batch[0][0])  # by the batch's first passage: a rerun with the same options repeats
            with torch.inference_mode():
                ids = self.model.generate(**enc, num_return_sequences=num_queries, max_new_tokens=max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id, **sampling)
            if not self.seq2seq:
                ids = ids[:, enc["input_ids"].size(1):]
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            out += [texts[i * num_queries: (i + 1) * num_queries] for i in range(len(batch))]
            bar.update(len(batch))
        bar.close()
        return out


def generate_queries(
    input_file: str,
    output_file: str,
    generator: QueryGenerator,
    *,
    prompt: str | None = None,
    prompt_file: str | None = None,
    num_queries: int = 3,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 32,
    seed: int = 42,
    copy_threshold: float = 0.6,
    chunk_size: int = 256,
    filter_scorer: Any = None,
    top_k: int | None = None,
    min_score: float | None = None,
    rank_sample_size: int = 99,
    dropped_file: str | None = None,
    show_progress: bool = True,
) -> GenerateSummary:
    """Write ``{"query", "pos": [passage], "generator"}`` rows for the passages of ``input_file`` to
    ``output_file`` (atomically; never over the input). A query is dropped as a copy when it is in the
    passage or at least ``copy_threshold`` of its word trigrams are (:func:`copied_share`; above 1: exact
    containment only). ``filter_scorer`` with ``top_k`` and/or ``min_score``: keep only the pairs
    `trine filter`'s consistency filter keeps (its dropped rows, with their reason, to ``dropped_file``)."""
    check_output([input_file, prompt_file], output_file)
    if dropped_file is not None:
        check_output([input_file, prompt_file], dropped_file, "dropped_file")
        check_distinct({"output_file": output_file, "dropped_file": dropped_file})
    filtering = top_k is not None or min_score is not None
    if filtering and filter_scorer is None:
        raise ValueError("top_k and min_score filter the pairs with a reference scorer: give one")
    if filter_scorer is not None and not filtering:
        raise ValueError("a filter scorer needs top_k and/or min_score")
    if dropped_file is not None and not filtering:
        raise ValueError("dropped_file is written by the consistency filter (top_k / min_score)")
    check_positive_int("chunk_size", chunk_size)
    if copy_threshold <= 0:
        raise ValueError(f"copy_threshold must be > 0 (above 1: exact copies only), got {copy_threshold}")
    template = load_prompt(prompt, prompt_file)
    passages = read_passages(input_file)
    provenance = {**generator.describe(), "prompt_sha256": prompt_hash(template), "num_queries": num_queries,
                  "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                  "copy_threshold": copy_threshold}
    summary = GenerateSummary(passages=len(passages))
    started = time.perf_counter()
    target = output_file
    if filtering:  # generated beside the output, then filtered into it
        parent = os.path.dirname(os.path.abspath(output_file))
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent, os.path.basename(output_file))
        fd, target = tempfile.mkstemp(prefix=temp_prefix(os.path.abspath(output_file)), dir=parent)
        os.close(fd)
    bar = progress_bar(total=len(passages), desc="generate", unit="passage", disable=not show_progress)
    try:
        with atomic_jsonl(target) as out:
            for c0 in range(0, len(passages), chunk_size):
                chunk = passages[c0 : c0 + chunk_size]
                replies = generator.generate([generator.prompt_text(template, p) for p in chunk],
                                             num_queries=num_queries, temperature=temperature, top_p=top_p,
                                             max_new_tokens=max_new_tokens, seed=seed + c0)
                for passage, raw in zip(chunk, replies):
                    for row in _rows(passage, raw, provenance, summary, copy_threshold):
                        write_row(out, row)
                bar.update(len(chunk))
        bar.close()
        if filtering:
            if summary.written == 0:
                raise ValueError(f"{input_file}: no query was kept to filter (every reply was empty or a copy)")
            summary.filtered = filter_pairs(target, output_file, scorer=filter_scorer, min_score=min_score,
                                            top_k=top_k, rank_sample_size=rank_sample_size, dedup=False,
                                            dropped_file=dropped_file, seed=seed, show_progress=show_progress)
    finally:
        bar.close()
        if filtering and os.path.exists(target):
            os.remove(target)
    summary.seconds = time.perf_counter() - started
    return summary


def _rows(passage: Passage, replies: list[str], provenance: dict[str, Any], summary: GenerateSummary,
          copy_threshold: float = 0.6) -> list[dict[str, Any]]:
    """The kept queries of one passage as training rows (empty replies, repeats and copies dropped)."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    body = normalise(passage.text)
    for raw in replies:
        summary.generated += 1
        query = clean_query(raw)
        key = normalise(query)
        if not key:
            summary.dropped["empty"] += 1
        elif key in seen:
            summary.dropped["duplicate"] += 1
        elif key in body or copied_share(query, passage.text) >= copy_threshold:
            summary.dropped["copies_passage"] += 1
        else:
            seen.add(key)
            generator = {**provenance, "passage_line": passage.line}
            if passage.id is not None:
                generator["passage_id"] = passage.id
            rows.append({"query": query, "pos": [passage.text], "generator": generator})
    summary.written += len(rows)
    return rows
