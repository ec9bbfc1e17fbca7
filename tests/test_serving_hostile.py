"""`trine serve` against hostile and careless clients: templates that would allocate gigabytes, values that are
valid JSON but no text (lone surrogates, NaN), bodies and texts beyond the limits, a full queue, foreign Host
headers, and a fixed-seed fuzz of every route. Every answer is a 2xx or a 4xx with a one-line message naming the
field, and the server keeps serving."""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import SERVE_DOCS as DOCS
from conftest import TEXTS, require
from test_serving import GatedEncoder, Server, _queue_depth

from trine.serving import ServeSettings, create_app
from trine.serving.common import ServerState

httpx = require("httpx2")

LIMITS = {"max_body_bytes": 64_000, "max_text_chars": 2_000, "max_texts_per_request": 16, "max_colbert_tokens": 200}


@pytest.fixture(scope="module")
def server(serve_m3, serve_reranker, serve_retriever):
    settings = ServeSettings(model_name="tiny-m3", max_wait_ms=1, **LIMITS)
    srv = Server(create_app(serve_m3, serve_reranker, serve_retriever, settings, documents=DOCS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _post(http, path: str, body: bytes | str | dict, **headers: str):
    content = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else
                                                    json.dumps(body).encode())
    return http.post(path, content=content, headers={"content-type": "application/json", **headers})


def _error(r) -> tuple[str, str | None]:
    body = r.json()["error"]
    if isinstance(body, dict):  # OpenAI's shape
        return body["message"], body["param"]
    return body, r.json().get("field")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_instruction_templates_are_plain_fields_only(http):
    """A 71-byte body with a format spec once answered 200 after 9 s and left the server 546 MB larger."""
    body = '{"texts":"a","prompt":"q","instruction_format":"{0:>10000000}{1}"}'
    _post(http, "/encode", body)  # warm up whatever a first error allocates
    before = _rss_mb()
    for _ in range(5):
        r = _post(http, "/encode", body)
        assert r.status_code == 400, r.text
        message, field = _error(r)
        assert field == "instruction_format" and "format spec" in message and "\n" not in message
    assert _rss_mb() - before < 5
    for template, words in (("{2}{1}", "numbered fields"), ("{", "Single '{'"), ("{x}", "only the plain fields"),
                            ("{0.__class__}{1}", "attributes"), ("{}", "needs exactly 2"), ("{0}{0}", "each once")):
        r = _post(http, "/encode", {"texts": "a", "prompt": "q", "instruction_format": template})
        assert r.status_code == 400, (template, r.text)
        message, field = _error(r)
        assert field == "instruction_format" and words in message, (template, message)
    r = _post(http, "/encode", {"texts": ["a"], "prompt": "q: ", "instruction_format": "{1} <- {0}",
                                "outputs": ["dense"]})
    assert r.status_code == 200, r.text


def test_the_cli_refuses_a_bad_template_with_exit_2(tiny_m3_dir, capsys):
    from trine.cli import main

    code = main(["serve", tiny_m3_dir, "--query_instruction_format", "{0:>99999}{1}", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --query_instruction_format: ") and "format spec" in err, err  # before loading


RAW_SURROGATE = b'"\\ud800"'


@pytest.mark.parametrize("path,field", [("/v1/embeddings", "input"), ("/encode", "texts"), ("/tokenize", "inputs"),
                                        ("/embed", "inputs"), ("/search", "query")])
def test_lone_surrogates_are_a_400_naming_the_field(http, path, field):
    r = _post(http, path, b'{"%s": %s}' % (field.encode(), RAW_SURROGATE))
    assert r.status_code == 400, r.text
    message, named = _error(r)
    assert named == field and "lone surrogate U+D800" in message
    r = _post(http, path, b'{"%s": ["fine", "x\\udfff"]}' % field.encode()) if path != "/search" else r
    if path != "/search":
        assert r.status_code == 400 and _error(r)[1] == f"{field}[1]", r.text
    r = _post(http, "/rerank", b'{"query": %s, "texts": ["a"]}' % RAW_SURROGATE)
    assert r.status_code == 400 and _error(r)[1] == "query"


def test_nan_and_infinity_get_a_422_that_can_be_answered(http):
    for path, body, field in (
        ("/v1/embeddings", b'{"input": NaN}', "input"),
        ("/encode", b'{"texts": "a", "truncate": Infinity}', "truncate"),
        ("/score", b'{"pairs": [["a", "b"]], "weights_for_different_modes": [NaN, 1, 1]}',
         "weights_for_different_modes[0]"),
        ("/search", b'{"query": "a", "mode": "sparse+dense", "weights": [1, -Infinity]}', "weights[1]"),
        ("/v1/embeddings", b'{"input": "a", "encoding_format": "\\ud800"}', "encoding_format"),
    ):
        r = _post(http, path, body)
        assert r.status_code == 422, (path, r.text)
        assert _error(r)[1] == field, (path, r.text)


def test_openai_dimensions_is_an_integer_and_the_model_is_the_served_one(http):
    for dims in ('"8"', "3.0", "true"):
        r = _post(http, "/v1/embeddings", f'{{"input": "a", "dimensions": {dims}}}')
        assert r.status_code == 422 and _error(r)[1] == "dimensions", (dims, r.text)
    r = _post(http, "/v1/embeddings", {"input": "a", "dimensions": 8})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
    r = _post(http, "/v1/embeddings", {"input": "a", "model": "text-embedding-3-small"})
    assert r.status_code == 404 and _error(r)[1] == "model" and "tiny-m3" in _error(r)[0]
    r = _post(http, "/v1/embeddings", {"input": "a", "model": "tiny-m3"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-m3"


def test_bodies_and_texts_beyond_the_limits_get_413_naming_the_limit(http, server):
    big = json.dumps({"inputs": "word " * 20_000})
    assert len(big) > LIMITS["max_body_bytes"]
    r = _post(http, "/embed", big)  # refused from Content-Length
    assert r.status_code == 413 and _error(r)[1] == "body" and "64000 bytes" in _error(r)[0], r.text

    def chunks():  # no Content-Length: refused as the stream passes the limit
        for _ in range(100):
            yield b" " * 1000

    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _error(r)[1] == "body", r.text
    r = _post(http, "/embed", {"inputs": ["short", "x" * 2_001]})
    assert r.status_code == 413 and _error(r)[1] == "inputs[1]" and "2000" in _error(r)[0], r.text
    r = _post(http, "/encode", {"texts": "x" * 1_990, "prompt": "an instruction of more than ten characters"})
    assert r.status_code == 413 and _error(r)[1] == "texts", r.text
    r = _post(http, "/embed", {"inputs": ["a"] * 17})
    assert r.status_code == 413 and _error(r)[1] == "inputs"
    many = ["ls lists directory contents in long format"] * 16  # ~ 16 x 11 tokens: under 200, then over
    assert _post(http, "/embed_all", {"inputs": many[:8]}).status_code == 200
    for path, body, field in (("/embed_all", {"inputs": many}, "inputs"),
                              ("/encode", {"texts": many, "outputs": ["colbert"]}, "texts")):
        r = _post(http, path, body)
        assert r.status_code == 413 and _error(r)[1] == field and "--max-colbert-tokens" in _error(r)[0], r.text
    assert _post(http, "/encode", {"texts": many, "outputs": ["dense", "sparse"]}).status_code == 200
    assert http.get("/health").json() == {"status": "ok"}


def test_empty_and_blank_texts_are_refused_on_every_route(http):
    for path, body, field in (("/embed", {"inputs": ["a", " \n\t"]}, "inputs[1]"),
                              ("/v1/embeddings", {"input": ""}, "input"), ("/encode", {"texts": "   "}, "texts"),
                              ("/tokenize", {"inputs": ["\u3000"]}, "inputs[0]"),
                              ("/score", {"pairs": [["q", " "]]}, "pairs[].passage[0]"),
                              ("/rerank", {"query": " ", "texts": ["a"]}, "query"),
                              ("/search", {"query": "\n"}, "query")):
        r = _post(http, path, body)
        assert r.status_code == 400, (path, r.text)
        message, named = _error(r)
        assert named == field and ("white space" in message or "empty" in message), (path, r.text)


def test_a_full_queue_refuses_before_reading_or_tokenising(serve_m3, monkeypatch):
    calls = []
    counts = ServerState.token_counts
    monkeypatch.setattr(ServerState, "token_counts",
                        lambda self, texts: calls.append(len(texts)) or counts(self, texts))
    gated = GatedEncoder(serve_m3)
    srv = Server(create_app(gated, settings=ServeSettings(max_queue=1, max_wait_ms=1, max_body_bytes=8_000_000,
                                                          max_text_chars=5_000_000)))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.post, "/embed", json={"inputs": TEXTS[0]})
            assert gated.entered.wait(30)
            second = pool.submit(client.post, "/embed", json={"inputs": TEXTS[1]})
            deadline = time.monotonic() + 30
            while _queue_depth(client) < 1 or len(calls) < 2:  # the second waits, its texts counted
                assert time.monotonic() < deadline
                time.sleep(0.01)
            seen = len(calls)
            big = json.dumps({"inputs": "word " * 800_000}).encode()  # 4 MB
            refused = client.post("/embed", content=big, headers={"content-type": "application/json"})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
            assert len(calls) == seen  # refused without tokenising
            assert client.get("/health").status_code == 200
            gated.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
            assert _queue_depth(client) == 0
    finally:
        gated.gate.set()
        srv.stop()


def test_host_allow_list(serve_m3):
    settings = ServeSettings(allowed_hosts=("localhost", "127.0.0.1", "*.corp.example"))
    srv = Server(create_app(serve_m3, settings=settings))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            assert client.get("/health").status_code == 200  # Host: 127.0.0.1:<port>
            assert client.get("/health", headers={"host": "api.corp.example"}).status_code == 200
            r = client.post("/embed", json={"inputs": "a"}, headers={"host": "attacker.example:8000"})
            assert r.status_code == 400 and "attacker.example" in r.json()["error"] and "--allowed-hosts" in r.text
    finally:
        srv.stop()
    assert ServeSettings(allowed_hosts=("*",)).allowed_hosts is None


def test_serve_defaults_guard_a_keyless_server(monkeypatch, tiny_m3_dir, caplog):
    import trine.cli.serving as cli_serving
    import trine.serving

    started = {}
    monkeypatch.setattr(trine.serving, "run_server", lambda app, host, port, **kw: started.update(
        app=app, host=host))
    from trine.cli import main

    assert main(["serve", tiny_m3_dir, "--port", "0"]) == 0
    assert started["app"].state.trine.settings.allowed_hosts == cli_serving.LOOPBACK
    assert started["app"].state.trine.settings.max_body_bytes == 2_000_000
    with caplog.at_level(logging.WARNING):
        assert main(["serve", tiny_m3_dir, "--host", "0.0.0.0", "--port", "0"]) == 0
    assert started["app"].state.trine.settings.allowed_hosts is None
    assert any("no API key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["serve", tiny_m3_dir, "--host", "0.0.0.0", "--api-key", "k", "--allowed-hosts", "a.example",
                     "--port", "0"]) == 0
    assert started["app"].state.trine.settings.allowed_hosts == ("a.example",)
    assert not any("no API key" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- the fuzz
VALID = {
    "/v1/embeddings": {"input": ["a text", "another"], "model": "tiny-m3", "encoding_format": "float",
                       "dimensions": 8},
    "/encode": {"texts": ["a text"], "kind": "query", "outputs": ["dense", "sparse"], "lexical": "tokens",
                "encoding_format": "base64", "truncate": True},
    "/score": {"pairs": [["q", "p"]], "weights_for_different_modes": [0.4, 0.2, 0.4], "max_query_length": 8},
    "/search": {"query": "list files", "k": 3, "mode": "sparse+dense", "weights": [1.0, 0.3]},
    "/embed": {"inputs": ["a"], "normalize": True, "truncate": True},
    "/embed_sparse": {"inputs": "a"},
    "/embed_all": {"inputs": ["a"]},
    "/rerank": {"query": "q", "texts": ["a", "b"], "raw_scores": False, "return_text": True},
    "/tokenize": {"inputs": ["a b"], "add_special_tokens": True},
}
WEIRD_STRINGS = ["", " ", "\ud800", "a\udfffb", "\x00", "\u202e\u0301", "😀" * 50, "{0:>99}{1}", "{", "a" * 3000,
                 "NaN", "null", "ls -la", "\n\t", "é" * 10]


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 3, 10**30, -(10**18), 2**63])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf"), -float("inf"), 3.0])
    if kind in (4, 5, 6):
        return rng.choice(WEIRD_STRINGS)
    if kind in (7, 8):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["input", "texts", "a", "\ud800", ""]): _value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _body(rng: random.Random, path: str) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([b"", b"{", b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000, b'{"a": ' * 3000 + b"1" +
                           b"}" * 3000, b"not json", b"\x00" * 10, b" " * 70_000, b"[]", b"1e999999"])
    body = dict(VALID.get(path, {"inputs": "a"}))
    for _ in range(rng.randrange(1, 3)):
        key = rng.choice([*body, "extra", "input", "texts"])
        if rng.random() < 0.15:
            body.pop(key, None)
        else:
            body[key] = _value(rng)
    return json.dumps(body, allow_nan=True).encode()


def test_fuzz_every_route_gets_2xx_or_4xx_and_the_server_stays_healthy(http):
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    for i in range(400):
        path = rng.choice([*VALID, "/nowhere", "/health", "/info"])
        body = _body(rng, path)
        content_type = rng.choice(["application/json"] * 8 + ["text/plain", "application/x-www-form-urlencoded"])
        if path in ("/health", "/info") and rng.random() < 0.5:
            r = http.get(path)
        else:
            r = http.post(path, content=body, headers={"content-type": content_type})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, path, body[:300], r.text[:300])
        if r.status_code >= 400:
            message, _ = _error(r)
            assert message and "\n" not in message, (path, r.text[:300])
        else:
            r.json()  # valid JSON
        if i % 50 == 0:
            assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/health").json() == {"status": "ok"}
    assert sum(n for s, n in statuses.items() if s < 300) >= 20, statuses  # the fuzz reached the models too
    r = _post(http, "/embed", {"inputs": "still serving"})
    assert r.status_code == 200 and np.isfinite(r.json()).all()


def test_concurrent_tokenising_never_races_the_model(serve_m3):
    """The server counts tokens (no truncation) in one thread while the model thread tokenises with truncation: on
    one shared fast tokenizer the truncation setting of one leaked into the other (a 638-token batch reached a
    512-position model: 500) or the Rust tokenizer refused a second borrower. Each thread has its own now."""
    srv = Server(create_app(serve_m3, settings=ServeSettings(max_wait_ms=1, max_queue=512)))
    long = " ".join(["the chmod command changes the file mode bits"] * 80)  # ~ 800 tokens > 512 positions
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as client, ThreadPoolExecutor(16) as pool:
            def call(i):
                if i % 3 == 0:
                    return client.post("/tokenize", json={"inputs": [long, TEXTS[i % len(TEXTS)]]})
                if i % 3 == 1:
                    return client.post("/encode", json={"texts": [long] * 4, "outputs": ["sparse"],
                                                        "lexical": "tokens"})
                return client.post("/embed", json={"inputs": [long, TEXTS[i % len(TEXTS)]] * 4})

            answers = list(pool.map(call, range(150)))
        assert [r.status_code for r in answers] == [200] * 150, [r.text for r in answers if r.status_code != 200][:2]
    finally:
        srv.stop()


def test_serve_takes_a_dense_only_folder_as_index_build_does(monkeypatch, splade_tiny_dir):
    import trine.serving
    from trine.cli import main

    started = {}
    monkeypatch.setattr(trine.serving, "run_server", lambda app, host, port, **kw: started.update(app=app))
    assert main(["serve", splade_tiny_dir, "--port", "0"]) == 0
    state = started["app"].state.trine
    assert state.embedder.outputs == ("dense",)
    assert state.embedder.query_instruction_format == "{}{}"  # the family's own template when none is given
