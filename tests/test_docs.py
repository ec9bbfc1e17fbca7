"""The README and the docs site: the site builds with ``mkdocs build --strict``, and every ```python / ```bash
block of README.md and docs/*.md either runs here, on tiny local models, or is marked not runnable with its reason.

A block is marked by an HTML comment on the line before its fence:
  ``<!-- not-run: REASON -->``  the block is not run (the reason is required: a GPU, a download, a benchmark...);
  ``<!-- run: serve -->``       a ``trine serve`` block: started as a background server for the page's later blocks.
Every other block runs, in page order, in one temporary folder per page holding the data files the pages name
(:data:`DATA_FILES`), with the Hub ids and ports the pages use replaced by local ones (:func:`substitutions`).
Bash blocks may hold only ``trine`` commands, run in-process through ``trine.cli.main``, and ``curl`` commands (to a
served page's server), run as processes; each must exit 0.
A docs block identical to a README block is run by the README test only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_tiny_reranker, require

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-run|run)\s*:\s*(.*?)\s*-->\s*$")
RUN_LANGS = ("python", "bash")
COMMANDS = ("trine", "curl")  # what a runnable bash block may call
ALIASES = {"sh": "bash", "shell": "bash", "console": "bash", "py": "python", "python3": "python"}  # would escape


@dataclass
class Block:
    page: str
    line: int  # the fence's line, 1-based
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("not-run", reason) or ("run", role)

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of a markdown file, with the marker comment on the last non-blank line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    page = str(path.relative_to(root))
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        found = MARKER.match(lines[j].strip()) if j >= 0 else None
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page}:{i + 1}: code block never closed")
        marker = (found.group(1), found.group(2)) if found else None
        blocks.append(Block(page, i + 1, opened.group(1), "\n".join(lines[i + 1:end]), marker))
        i = end + 1
    return blocks


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------- the data the pages name
TRAIN_PAIRS = [
    ("change file permissions", "The chmod command changes the file mode bits of each given file according to mode."),
    ("copy files and directories", "cp copies SOURCE to DEST, or multiple SOURCE files to a DIRECTORY."),
    ("list directory contents", "ls lists information about the FILEs, the current directory by default."),
    ("move or rename files", "mv renames SOURCE to DEST, or moves SOURCE files to a DIRECTORY."),
    ("remove files", "rm removes each specified file. By default, it does not remove directories."),
    ("create a directory", "mkdir creates the DIRECTORY, if it does not already exist."),
    ("print lines matching a pattern", "grep searches each FILE for lines that match the given patterns."),
    ("concatenate files", "cat concatenates FILEs to standard output; with no FILE it reads standard input."),
    ("display the first lines of a file", "head prints the first 10 lines of each FILE to standard output."),
    ("display the last lines of a file", "tail prints the last 10 lines of each FILE to standard output."),
    ("sort lines of text files", "sort writes the sorted concatenation of all FILEs to standard output."),
    ("count lines words and bytes", "wc prints newline, word and byte counts for each FILE."),
    ("change file owner and group", "chown changes the user and group ownership of each given file."),
    ("create an endpoint for communication", "socket() creates an endpoint for communication and returns a file "
     "descriptor that refers to that endpoint."),
    ("allocate dynamic memory", "The malloc() function allocates size bytes and returns a pointer to the memory."),
    ("formatted output conversion", "The printf family of functions produces output according to a format."),
    ("report file system disk space usage", "df displays the amount of disk space available on the file system."),
    ("estimate file space usage", "du summarizes the disk usage of each FILE, recursively for directories."),
    ("find files in a directory hierarchy", "find searches the directory tree rooted at each starting point."),
    ("compress or expand files", "gzip reduces the size of the named files using Lempel-Ziv coding."),
]
QUERIES = {"q1": "how do I change file permissions", "q2": "copy a directory", "q3": "count the words in a file",
           "q4": "free disk space on the file system"}
QRELS = {"q1": "d0", "q2": "d1", "q3": "d11", "q4": "d16"}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_data_files(folder: Path) -> None:
    """The files the pages' blocks read: ``train.jsonl`` (pairs), a BEIR folder ``my-beir`` and ``corpus.jsonl``."""
    _jsonl(folder / "train.jsonl", [{"query": q, "pos": [p]} for q, p in TRAIN_PAIRS])
    corpus = [{"_id": f"d{i}", "title": "", "text": p} for i, (_, p) in enumerate(TRAIN_PAIRS)]
    _jsonl(folder / "my-beir" / "corpus.jsonl", corpus)
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "my-beir" / "queries.jsonl", [{"_id": k, "text": v} for k, v in QUERIES.items()])
    (folder / "my-beir" / "qrels").mkdir()
    (folder / "my-beir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in QRELS.items()), encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitutions(models: dict[str, str], port: int) -> list[tuple[str, str]]:
    """What the pages name -> what this machine has: Hub ids -> tiny local folders, the example port -> a free one.
    Longer strings first, so that ``BAAI/bge-m3`` is replaced before any shorter name it contains."""
    return [
        ("BAAI/bge-reranker-v2-m3", models["reranker"]),
        ("BAAI/bge-m3", models["m3"]),
        ("--port 8000", f"--port {port}"),
        ("127.0.0.1:8000", f"127.0.0.1:{port}"),
        ("localhost:8000", f"localhost:{port}"),
    ]


def substitute(code: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        code = code.replace(old, new)
    return code


# ---------------------------------------------------------------------------------------------- running the blocks
def bash_commands(block: Block) -> list[list[str]]:
    """The commands of a bash block (continuation lines joined, comments dropped); only :data:`COMMANDS` run here."""
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] not in COMMANDS:
            raise AssertionError(f"{block.where()}: {argv[0]!r}: only trine and curl commands run here; mark the block "
                                 "<!-- not-run: REASON --> if it cannot run offline on tiny models")
        commands.append(argv)
    return commands


class PageRunner:
    """Runs one page's blocks in order in ``folder``, a background server for a ``run: serve`` block."""

    def __init__(self, folder: Path, table: list[tuple[str, str]], port: int):
        self.folder, self.table, self.port = folder, table, port
        self.namespace: dict = {"__name__": "__docs__"}
        self.servers: list[subprocess.Popen] = []
        self.printed: list[tuple[list[str], str]] = []  # (argv, stdout) of every trine command run

    def run(self, block: Block) -> None:
        code = substitute(block.code, self.table)
        if block.marker == ("run", "serve"):
            self.serve(block, code)
        elif block.marker is not None and block.marker[0] == "run":
            raise AssertionError(f"{block.where()}: unknown marker run: {block.marker[1]!r} (known: serve)")
        elif block.lang == "python":
            exec(compile(code, block.where(), "exec"), self.namespace)  # the documented code, as a reader runs it
        else:
            from trine.cli import main

            for argv in bash_commands(Block(block.page, block.line, block.lang, code, block.marker)):
                if argv[0] == "curl":
                    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                    assert out.returncode == 0, f"{block.where()}: {shlex.join(argv)}: {out.stdout}{out.stderr}"
                    continue
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    rc = main(argv[1:])
                self.printed.append((argv, out.getvalue()))
                assert rc == 0, f"{block.where()}: {shlex.join(argv)} exited {rc}"

    def serve(self, block: Block, code: str) -> None:
        (argv,) = bash_commands(Block(block.page, block.line, block.lang, code, block.marker))
        assert argv[1] == "serve", f"{block.where()}: a run: serve block holds one trine serve command"
        env = dict(os.environ, PYTHONPATH=str(SRC))
        log_path = self.folder / f"serve-{len(self.servers)}.log"
        with open(log_path, "wb") as log:  # the child holds its own copy of the handle
            proc = subprocess.Popen([sys.executable, "-m", "trine", *argv[1:]], cwd=self.folder, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.servers.append(proc)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{block.where()}: the server exited {proc.returncode}: "
                                     f"{log_path.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.5)
        raise AssertionError(f"{block.where()}: the server did not answer /health within 180 s")

    def close(self) -> None:
        for proc in self.servers:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_page(blocks: list[Block], folder: Path, models: dict[str, str], skip: set[str] = frozenset()) -> PageRunner:
    port = free_port()
    runner = PageRunner(folder, substitutions(models, port), port)
    write_data_files(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for block in blocks:
            if block.lang in RUN_LANGS and not (block.marker and block.marker[0] == "not-run") \
                    and block.code not in skip:
                runner.run(block)
    finally:
        os.chdir(cwd)
        runner.close()
    return runner


@pytest.fixture(scope="module")
def models(tiny_m3_dir, xlmr_tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    """The one table of local stand-ins for the models the pages name (shared by every page): the tiny
    BGE-M3-layout model and a tiny cross-encoder on the same (real XLM-R) tokenizer."""
    reranker = make_tiny_reranker(str(tmp_path_factory.mktemp("docs_reranker")), xlmr_tokenizer_dir, "xlmr")
    # named as the Hub id's last part, as a download is: the served model name the pages' clients send
    m3 = shutil.copytree(tiny_m3_dir, tmp_path_factory.mktemp("docs_m3") / "bge-m3")
    return {"m3": str(m3), "reranker": reranker}


# ---------------------------------------------------------------------------------------------- the tests
def test_every_block_is_run_or_marked():
    """A python / bash block without a marker is run below; a not-run marker needs its reason."""
    problems = []
    for page in doc_pages():
        for block in parse_blocks(page):
            if block.marker and block.marker[0] == "not-run" and not block.marker[1]:
                problems.append(f"{block.where()}: not-run without a reason")
            if block.marker and block.marker[0] == "run" and block.marker[1] != "serve":
                problems.append(f"{block.where()}: unknown marker run: {block.marker[1]}")
            if block.lang in ALIASES:
                problems.append(f"{block.where()}: ```{block.lang}: write ```{ALIASES[block.lang]} (so that it is run)")
            if block.lang == "bash" and block.marker is None:
                try:
                    bash_commands(block)
                except AssertionError as err:
                    problems.append(str(err))
    assert not problems, "\n".join(problems)


def test_parse_blocks_reads_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- not-run: needs a GPU -->\n```bash\ntrine x\n```\n\n```python\nprint(1)\n```\n")
    blocks = parse_blocks(page, root=tmp_path)
    assert [(b.page, b.line, b.lang, b.code, b.marker) for b in blocks] == [
        ("p.md", 4, "bash", "trine x", ("not-run", "needs a GPU")), ("p.md", 8, "python", "print(1)", None)]


def test_data_format_samples(tmp_path, monkeypatch):
    """data-formats.md: its sample training records are valid training data, and its bad file gives exactly the
    error the page shows (the one reader every training-data command validates with)."""
    from trine.data.reader import DataError
    from trine.data.records import read_records

    blocks = parse_blocks(ROOT / "docs" / "data-formats.md")
    samples = [b for b in blocks if b.lang == "json" and '"query"' in b.code]
    assert len(samples) == 2
    good = tmp_path / "samples.jsonl"
    good.write_text("".join(json.dumps(json.loads(b.code)) + "\n" for b in samples), encoding="utf-8")
    assert [r.query for r in read_records(str(good))] == [json.loads(b.code)["query"] for b in samples]
    bad_block = next(b for b in blocks if b.lang == "text" and b.code.startswith('{"query"'))
    shown = next(b for b in blocks if b.lang == "text" and b.code.startswith("error: "))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text(bad_block.code + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records("bad.jsonl")
    assert f"error: {err.value}" == shown.code


def test_readme_journeys_run(tmp_path, models):
    """The README's five journeys, for real, on the tiny BGE-M3-layout model; then what each one made."""
    blocks = parse_blocks(ROOT / "README.md")
    runner = run_page(blocks, tmp_path, models)
    ns = runner.namespace
    # (a) encode: FlagEmbedding's keys, every compute_score mode, and the three outputs consistent with each other
    assert set(ns["scores"]) >= {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    assert ns["dense"].shape == (2, 2)
    assert ns["scores"]["sparse"][0] == pytest.approx(float(ns["lexical"]), abs=1e-5)
    assert ns["scores"]["colbert"][0] == pytest.approx(float(ns["colbert"]), abs=1e-5)
    assert ns["scores"]["dense"][0] == pytest.approx(float(ns["dense"][0, 0]), abs=1e-5)
    # (b) mine + finetune: every record got its 7 negatives, and a BGE-M3-layout model was written
    mined = [json.loads(line) for line in (tmp_path / "train_mined.jsonl").read_text().splitlines()]
    assert len(mined) == len(TRAIN_PAIRS) and all(len(r["neg"]) == 7 for r in mined)
    for name in ("colbert_linear.pt", "sparse_linear.pt", "config.json"):
        assert (tmp_path / "my-model" / name).is_file(), name
    # (c) eval: every asked mode measured; BM25 finds these queries' documents (they share their words)
    results = json.loads((tmp_path / "eval-results" / "results.json").read_text())
    (measured,) = results["models"].values()
    for mode in ("dense", "sparse", "colbert", "colbert+sparse+dense", "bm25"):
        assert 0.0 <= measured["metrics"][mode]["ndcg@10"] <= 1.0, mode
    assert measured["metrics"]["bm25"]["ndcg@10"] > 0.5
    # (d) serve + openai: one vector per input, of the model's hidden size
    hidden = json.loads((Path(models["m3"]) / "config.json").read_text())["hidden_size"]
    assert [len(d.embedding) for d in ns["response"].data] == [hidden, hidden]
    # (e) index build + search: one JSON line for the one query, 5 hits from the corpus
    (search_out,) = [out for argv, out in runner.printed if argv[1:3] == ["index", "search"]]
    (line,) = search_out.strip().splitlines()
    hits = json.loads(line)["hits"]
    assert len(hits) == 5 and {h["id"] for h in hits} <= {f"d{i}" for i in range(len(TRAIN_PAIRS))}


@pytest.mark.parametrize("page", [p.name for p in sorted((ROOT / "docs").glob("*.md"))])
def test_docs_page_blocks_run(page, tmp_path, models):
    """Each docs page's runnable blocks (those not already run as README blocks)."""
    readme = {b.code for b in parse_blocks(ROOT / "README.md")}
    run_page(parse_blocks(ROOT / "docs" / page), tmp_path, models, skip=readme)


def test_mkdocs_build_strict(tmp_path):
    """The site builds with every warning an error (broken links, missing pages, API references that
    do not resolve), its CLI page rendered from the parsers holds every command."""
    require("mkdocs")
    require("mkdocstrings_handlers.python")
    env = dict(os.environ, PYTHONPATH=str(SRC), NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    from trine.cli.reference import command_names

    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    for name in command_names():
        assert f"trine {name}" in cli_page, name
    # the training commands' help comes from Hugging Face's parser over trine's dataclasses: their options too
    for flag in ("--train_group_size", "--unified_finetuning", "--reranker_loss", "--max-batch-tokens"):
        assert flag in cli_page, flag
