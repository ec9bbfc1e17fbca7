"""`trine serve`: a real uvicorn server on 127.0.0.1 (ephemeral port, background thread) over the tiny models,
called with the real `openai` client and raw HTTP; every answer checked against the in-process API."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import SERVE_DOC_IDS as DOC_IDS
from conftest import SERVE_DOCS as DOCS
from conftest import TEXTS, require

from trine.retrieval import QueryReps
from trine.serving import ServeSettings, create_app

uvicorn = require("uvicorn")
httpx = require("httpx2")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """uvicorn serving ``app`` in a daemon thread on an ephemeral port of 127.0.0.1."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def m3(serve_m3):
    return serve_m3


@pytest.fixture(scope="module")
def reranker(serve_reranker):
    return serve_reranker


@pytest.fixture(scope="module")
def retriever(serve_retriever):
    return serve_retriever


@pytest.fixture(scope="module")
def server(m3, reranker, retriever):
    settings = ServeSettings(model_name="tiny-m3", api_key=KEY, max_texts_per_request=16, max_wait_ms=2)
    srv = Server(create_app(m3, reranker, retriever, settings, documents=DOCS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def test_openai_client_gets_the_encoders_vectors(server, m3):
    openai = require("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    want = m3.encode(TEXTS)["dense_vecs"]
    # the client's default asks for base64 and decodes it itself; "base64" given explicitly comes back as text
    for fmt in ("float", None, "base64"):
        options = {} if fmt is None else {"encoding_format": fmt}
        got = client.embeddings.create(model="tiny-m3", input=TEXTS, **options)
        assert [d.index for d in got.data] == list(range(len(TEXTS)))
        vecs = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                for d in got.data]
        np.testing.assert_allclose(np.array(vecs), want, atol=1e-5)
        counts = [min(len(ids), 64) for ids in m3.tokenizer(TEXTS)["input_ids"]]
        assert got.usage.prompt_tokens == got.usage.total_tokens == sum(counts)
        assert got.model == "tiny-m3"
    one = client.embeddings.create(model="tiny-m3", input=TEXTS[1])
    np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-5)
    # dimensions: the first N, renormalised
    short = client.embeddings.create(model="tiny-m3", input=TEXTS[:3], dimensions=8, encoding_format="float")
    cut = want[:3, :8] / np.linalg.norm(want[:3, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array([d.embedding for d in short.data]), cut, atol=1e-5)


def test_raw_base64_is_little_endian_float32(http, m3):
    r = http.post("/v1/embeddings", json={"input": TEXTS[:2], "model": "tiny-m3", "encoding_format": "base64"})
    assert r.status_code == 200
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    np.testing.assert_allclose(np.stack(vecs), m3.encode(TEXTS[:2])["dense_vecs"], atol=1e-5)


def test_tei_routes(http, m3):
    want = m3.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    r = http.post("/embed", json={"inputs": TEXTS})
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()), want["dense_vecs"], atol=1e-5)
    one = http.post("/embed", json={"inputs": TEXTS[0]}).json()
    assert len(one) == 1 and np.allclose(one[0], want["dense_vecs"][0], atol=1e-5)

    sparse = http.post("/embed_sparse", json={"inputs": TEXTS}).json()
    assert len(sparse) == len(TEXTS)
    for got, ref in zip(sparse, want["lexical_weights"]):
        assert [e["index"] for e in got] == sorted(int(i) for i in ref)
        assert all(isinstance(e["index"], int) for e in got)
        for e in got:
            assert e["value"] == pytest.approx(ref[str(e["index"])], abs=1e-5)

    every = http.post("/embed_all", json={"inputs": TEXTS[:3]}).json()
    for got, ref in zip(every, want["colbert_vecs"][:3]):
        np.testing.assert_allclose(np.array(got), ref, atol=1e-5)

    toks = http.post("/tokenize", json={"inputs": [TEXTS[0]]}).json()
    assert [t["id"] for t in toks[0]] == m3.tokenizer(TEXTS[0])["input_ids"]
    assert toks[0][0]["special"] and not toks[0][1]["special"]
    assert "".join(t["text"] for t in toks[0][1:-1]).replace(" ", "") == TEXTS[0].replace(" ", "")

    info = http.get("/info").json()
    assert info["model_id"] == "tiny-m3" and info["outputs"] == ["dense", "sparse", "colbert"]
    assert info["max_client_batch_size"] == 16 and info["index"]["documents"] == len(DOCS)


def test_encode_and_score(http, m3):
    r = http.post("/encode", json={"texts": TEXTS[:4], "kind": "query", "outputs": ["dense", "sparse", "colbert"]})
    assert r.status_code == 200, r.text
    want = m3.encode_queries(TEXTS[:4], return_sparse=True, return_colbert_vecs=True)
    data = r.json()["data"]
    np.testing.assert_allclose(np.array([d["dense_vecs"] for d in data]), want["dense_vecs"], atol=1e-5)
    for d, lw, cv in zip(data, want["lexical_weights"], want["colbert_vecs"]):
        assert d["lexical_weights"].keys() == lw.keys()
        np.testing.assert_allclose([d["lexical_weights"][k] for k in lw], list(lw.values()), atol=1e-5)
        np.testing.assert_allclose(np.array(d["colbert_vecs"]), cv, atol=1e-5)
    packed = http.post("/encode", json={"texts": TEXTS[:4], "kind": "query", "outputs": ["dense", "colbert"],
                                        "encoding_format": "base64"}).json()["data"]
    for d, dense, cv in zip(packed, want["dense_vecs"], want["colbert_vecs"]):
        assert set(d) == {"dense_vecs", "colbert_vecs"}
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(d["dense_vecs"]), "<f4"), dense, atol=1e-5)
        got = np.frombuffer(base64.b64decode(d["colbert_vecs"]), "<f4").reshape(-1, cv.shape[1])
        np.testing.assert_allclose(got, cv, atol=1e-5)
    tokens = http.post("/encode", json={"texts": "malloc", "outputs": ["sparse"], "lexical": "tokens",
                                        "prompt": "Represent: "}).json()["data"][0]
    assert set(tokens) == {"lexical_weights"}
    ref = m3.encode("malloc", return_dense=False, return_sparse=True, instruction="Represent: ")
    assert tokens["lexical_weights"] == pytest.approx(m3.convert_id_to_token(ref["lexical_weights"]), abs=1e-5)

    pairs = [[TEXTS[0], TEXTS[1]], [TEXTS[4], TEXTS[5]], [TEXTS[2], TEXTS[6]]]
    weights = [0.4, 0.2, 0.4]
    got = http.post("/score", json={"pairs": pairs, "weights_for_different_modes": weights}).json()
    ref = m3.compute_score([tuple(p) for p in pairs], weights_for_different_modes=weights)
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)


def test_rerank_equals_compute_score(http, reranker):
    query, texts = TEXTS[0], TEXTS[1:6]
    for raw in (False, True):
        got = http.post("/rerank", json={"query": query, "texts": texts, "raw_scores": raw,
                                         "return_text": True}).json()
        ref = reranker.compute_score([(query, t) for t in texts], normalize=not raw)
        assert [g["index"] for g in got] == sorted(range(len(texts)), key=lambda i: -ref[i])
        for g in got:
            assert g["score"] == pytest.approx(ref[g["index"]], abs=1e-5)
            assert g["text"] == texts[g["index"]]
    assert "text" not in http.post("/rerank", json={"query": query, "texts": texts}).json()[0]


@pytest.mark.parametrize("mode,extra", [("dense", {}), ("sparse", {}), ("colbert", {}),
                                        ("colbert", {"colbert_search": "full"}),
                                        ("sparse+dense", {}), ("sparse+dense", {"normalization": "minmax"}),
                                        ("colbert+sparse+dense", {"weights": [1.0, 0.5, 0.7]})])
def test_search_equals_the_retriever(http, m3, retriever, mode, extra):
    query, k = "how to list files in a directory", 5
    r = http.post("/search", json={"query": query, "k": k, "mode": mode, **extra})
    assert r.status_code == 200, r.text
    reps = QueryReps.from_encode(m3.encode_queries([query], return_sparse=True, return_colbert_vecs=True))
    if mode in ("dense", "sparse") or extra.get("colbert_search") == "full":
        ref = retriever.first_stage(reps, mode, k)
    elif mode == "colbert":
        ref = retriever.multivector.rerank(reps.colbert_vecs, retriever.first_stage(reps, "dense", 100), k)
    elif mode == "sparse+dense":
        ref = retriever.search(reps, k, {"dense": 1.0, "sparse": 0.3}, candidate_k=k,
                               normalization=extra.get("normalization", "none"))
    else:
        ref = retriever.search(reps, k, {"dense": 1.0, "sparse": 0.5, "colbert": 0.7}, candidate_k=k)
    hits = r.json()["results"]
    assert [h["id"] for h in hits] == [DOC_IDS[i] for i in ref.rows[0].tolist() if i >= 0]
    np.testing.assert_allclose([h["score"] for h in hits], ref.scores[0][ref.rows[0] >= 0], atol=1e-5)


def test_search_reranked_equals_the_retriever_then_compute_score(http, m3, retriever, reranker):
    query, k, top = "how to list files in a directory", 3, 6
    for mode, extra in (("dense", {"rerank_top_k": top}), ("sparse+dense", {"rerank_top_k": top}),
                        ("sparse", {})):
        r = http.post("/search", json={"query": query, "k": k, "mode": mode, "rerank": True, **extra})
        assert r.status_code == 200, r.text
        n = extra.get("rerank_top_k", len(DOCS))  # the server's default (100) is more than the corpus holds
        assert r.json()["rerank_top_k"] == extra.get("rerank_top_k", 100)
        reps = QueryReps.from_encode(m3.encode_queries([query], return_sparse=True, return_colbert_vecs=True))
        weights = {"dense": 1.0, "sparse": 0.3} if mode == "sparse+dense" else None
        first = retriever.search_mode(reps, mode, n, weights=weights)
        rows = [i for i in first.rows[0].tolist() if i >= 0]
        scores = reranker.compute_score([(query, DOCS[i]) for i in rows])
        best = sorted(range(len(rows)), key=lambda j: -scores[j])[:k]
        hits = r.json()["results"]
        assert [h["id"] for h in hits] == [DOC_IDS[rows[j]] for j in best]
        np.testing.assert_allclose([h["score"] for h in hits], [scores[j] for j in best], atol=1e-5)
        retrieval = dict(zip(first.rows[0].tolist(), first.scores[0].tolist()))
        np.testing.assert_allclose([h["retrieval_score"] for h in hits], [retrieval[rows[j]] for j in best],
                                   atol=1e-5)
    plain = http.post("/search", json={"query": query, "k": k}).json()
    assert "rerank_top_k" not in plain and "retrieval_score" not in plain["results"][0]


BAD = [
    # (path, body or raw bytes, status, field)
    ("/v1/embeddings", {"input": 5, "model": "x"}, 422, "input"),
    ("/v1/embeddings", {"input": ["a", 3]}, 422, "input[1]"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, 400, "input[1]"),
    ("/v1/embeddings", {"input": ["a"] * 17}, 413, "input"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": "a", "dimensions": 999}, 400, "dimensions"),
    ("/v1/embeddings", b"{not json", 422, None),
    ("/embed", {"inputs": "word " * 100, "truncate": False}, 413, "inputs"),
    ("/embed", {"inputs": ["ok", "word " * 100], "truncate": False}, 413, "inputs[1]"),
    ("/embed", {"input": "a"}, 422, "inputs"),
    ("/embed_sparse", {"inputs": []}, 400, "inputs"),
    ("/rerank", {"query": "q", "texts": "not a list"}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": []}, 400, "texts"),
    ("/encode", {"texts": ["a"], "outputs": ["dense", "bogus"]}, 400, "outputs[1]"),
    ("/encode", {"texts": ["a"], "kind": "document"}, 422, "kind"),
    ("/score", {"pairs": [["a", "b"]], "weights_for_different_modes": [1, 2]}, 400, "weights_for_different_modes"),
    ("/score", {"pairs": [["a"]]}, 422, "pairs[0][1]"),
    ("/search", {"query": "q", "mode": "bogus"}, 400, "mode"),
    ("/search", {"query": "q", "mode": "dense", "normalization": "minmax"}, 400, "normalization"),
    ("/search", {"query": "q", "mode": "sparse+dense", "normalization": "bogus"}, 400, "normalization"),
    ("/search", {"query": "q", "k": 0}, 422, "k"),
    ("/search", {"query": ""}, 400, "query"),
    ("/search", {"query": "q", "rerank_top_k": 5}, 400, "rerank_top_k"),
    ("/search", {"query": "q", "k": 5, "rerank": True, "rerank_top_k": 2}, 400, "rerank_top_k"),
    ("/search", {"query": "q", "rerank": True, "rerank_top_k": 0}, 422, "rerank_top_k"),
    ("/encode", {"texts": ["a"], "encoding_format": "int8"}, 422, "encoding_format"),
]


def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(http, server):
    for path, body, status, field in BAD:
        r = http.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
            else http.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        if path.startswith("/v1/"):
            assert err["code"] == status and err["message"]
            assert field is None or err["param"] == field, (path, r.text)
        else:
            assert isinstance(err, str) and r.json()["field"] == field, (path, r.text)
    assert http.post("/nowhere", json={}).status_code == 404
    assert http.get("/embed").status_code == 405
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200  # open without the key
        r = anonymous.post("/embed", json={"inputs": "a"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        wrong = anonymous.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
        assert anonymous.get("/metrics").status_code == 401
    assert http.get("/health").json() == {"status": "ok"}
    assert http.post("/embed", json={"inputs": "still here"}).status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("trine_queue_depth ", "trine_batch_texts_bucket", "trine_request_duration_seconds_bucket",
                 'trine_tokens_total{route="/embed"}'):
        assert name in metrics.text


class GatedEncoder:
    """The encoder, held inside its call until the test opens the gate: the server's state is then known."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_result(self, texts, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.encode_result(texts, *args, **kwargs)


def _queue_depth(client) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith("trine_queue_depth "))
    return float(line.split()[1])


def test_a_burst_beyond_the_queue_gets_429_and_no_5xx(m3):
    gated = GatedEncoder(m3)
    srv = Server(create_app(gated, settings=ServeSettings(max_queue=1, max_batch_texts=4, max_wait_ms=1)))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(12) as pool:
            def call(i):
                return client.post("/embed", json={"inputs": [TEXTS[i % len(TEXTS)]]})

            # one request inside the encoder, one waiting in the queue of one: every further request is refused
            first = pool.submit(call, 0)
            assert gated.entered.wait(30)
            second = pool.submit(call, 1)
            deadline = time.monotonic() + 30
            while _queue_depth(client) < 1:
                assert time.monotonic() < deadline, "the second request never reached the queue"
                time.sleep(0.01)
            refused = list(pool.map(call, range(2, 12)))
            gated.gate.set()
            accepted = [first.result(), second.result()]
            assert [a.status_code for a in refused] == [429] * 10
            for a in refused:
                assert a.headers["retry-after"] == "1" and "busy" in a.json()["error"]
            for i, a in enumerate(accepted):
                assert a.status_code == 200
                np.testing.assert_allclose(a.json()[0], m3.encode(TEXTS[i])["dense_vecs"], atol=1e-5)
            assert client.get("/health").status_code == 200
            assert "trine_rejected_total 10.0" in client.get("/metrics").text
    finally:
        gated.gate.set()
        srv.stop()


def test_concurrent_requests_are_merged_into_one_encoder_call(m3):
    gated = GatedEncoder(m3)
    calls: list[int] = []
    inner_encode = gated.encode_result

    def counted(texts, *args, **kwargs):
        calls.append(len(texts))
        return inner_encode(texts, *args, **kwargs)

    gated.encode_result = counted
    srv = Server(create_app(gated, settings=ServeSettings(max_batch_texts=64, max_wait_ms=1)))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            def call(i):
                return client.post("/embed", json={"inputs": TEXTS[2 * i: 2 * i + 2]})

            # the first request holds the encoder; the three sent meanwhile wait together and go in one call
            futures = [pool.submit(call, 0)]
            assert gated.entered.wait(30)
            futures += [pool.submit(call, i) for i in range(1, 4)]
            deadline = time.monotonic() + 30
            while _queue_depth(client) < 3:
                assert time.monotonic() < deadline, "the requests never reached the queue"
                time.sleep(0.01)
            gated.gate.set()
            answers = [f.result() for f in futures]
        want = m3.encode(TEXTS)["dense_vecs"]
        for i, a in enumerate(answers):
            np.testing.assert_allclose(np.array(a.json()), want[2 * i: 2 * i + 2], atol=1e-5)
        assert calls == [2, 6], calls
    finally:
        gated.gate.set()
        srv.stop()


def test_concurrent_requests_are_merged_up_to_the_token_budget(m3):
    gated = GatedEncoder(m3)
    calls: list[int] = []
    inner_encode = gated.encode_result

    def counted(texts, *args, **kwargs):
        calls.append(len(texts))
        return inner_encode(texts, *args, **kwargs)

    gated.encode_result = counted
    # three waiting requests of one text each; the budget holds the first two (in queue order), not the third
    texts = [TEXTS[0], TEXTS[3], TEXTS[5], TEXTS[6]]
    tokens = [min(len(ids), m3.passage_max_length) for ids in m3.tokenizer(texts)["input_ids"]]
    budget = tokens[1] + tokens[2]
    assert tokens[3] > 0 and tokens[1] + tokens[2] + tokens[3] > budget
    srv = Server(create_app(gated, settings=ServeSettings(max_batch_texts=64, max_batch_tokens=budget,
                                                          max_wait_ms=1)))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            def call(i):
                return client.post("/embed", json={"inputs": [texts[i]]})

            futures = [pool.submit(call, 0)]  # holds the encoder
            assert gated.entered.wait(30)
            deadline = time.monotonic() + 30
            for i in (1, 2, 3):  # one at a time, so the queue's order is known
                futures.append(pool.submit(call, i))
                while _queue_depth(client) < i:
                    assert time.monotonic() < deadline, "the requests never reached the queue"
                    time.sleep(0.01)
            gated.gate.set()
            answers = [f.result() for f in futures]
            metrics = client.get("/metrics").text
        want = m3.encode(texts)["dense_vecs"]
        for i, a in enumerate(answers):
            assert a.status_code == 200
            np.testing.assert_allclose(a.json()[0], want[i], atol=1e-5)
        assert calls == [1, 2, 1], calls
        total = next(x for x in metrics.splitlines() if x.startswith("trine_batch_tokens_sum "))
        assert float(total.split()[1]) == sum(tokens)
    finally:
        gated.gate.set()
        srv.stop()


def test_search_rerank_needs_a_reranker_and_the_documents(m3, reranker, retriever, tmp_path):
    from trine.serving import load_documents

    for rr, docs, message in ((None, DOCS, "no reranker is loaded"), (reranker, None, "no document texts")):
        srv = Server(create_app(m3, rr, retriever, documents=docs))
        try:
            r = httpx.post(f"{srv.url}/search", json={"query": "list files", "rerank": True}, timeout=60)
            assert r.status_code == 400 and r.json()["field"] == "rerank" and message in r.json()["error"], r.text
        finally:
            srv.stop()
    with pytest.raises(ValueError, match="one per document"):
        create_app(m3, reranker, retriever, documents=DOCS[:-1])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "b", "title": "ls", "text": "list directory contents"}\n'
                      '{"_id": "a", "text": "grep prints matching lines"}\n')
    assert load_documents(corpus, ["a", "b"]) == ["grep prints matching lines", "ls list directory contents"]
    with pytest.raises(ValueError, match="'c'"):
        load_documents(corpus, ["a", "c"])


def test_serve_options_from_flags_and_a_yaml_file(tmp_path):
    from trine.cli import build_parser
    from trine.cli.parser import parse_command
    from trine.errors import OptionError

    parser = build_parser()
    args = parse_command(parser, "serve", ["M", "--port", "0", "--max_queue", "3", "--no-truncate",
                                           "--api-key", "k"])
    assert (args.model, args.port, args.max_queue, args.no_truncate, args.api_key) == ("M", 0, 3, True, "k")
    config = tmp_path / "serve.yaml"
    config.write_text("model: M\nmax-batch-texts: 8\nmax_wait_ms: 2.5\nno_truncate: true\nreranker: R\n")
    args = parse_command(parser, "serve", [str(config)])
    assert (args.max_batch_texts, args.max_wait_ms, args.no_truncate, args.reranker) == (8, 2.5, True, "R")
    with pytest.raises(OptionError):
        parse_command(parser, "serve", ["M", "--max-queue", "many"])
    with pytest.raises(ValueError, match="max_queue"):
        ServeSettings(max_queue=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ServeSettings(max_batch_tokens=0)
    args = parse_command(parser, "serve", ["M", "--max-batch-tokens", "512", "--reranker-top-k", "20",
                                           "--documents", "C"])
    assert (args.max_batch_tokens, args.reranker_top_k, args.documents) == (512, 20, "C")


def test_search_applies_the_calibrated_fusion_of_fusion_json(m3, retriever):
    """The server's fusion settings (fusion.json) with confidence coefficients: /search ranks as the retriever's
    calibrated fusion; a request giving its own weights fuses plainly (the coefficients belong to the file's)."""
    from trine.modeling.fusion import FusionSettings

    fusion = FusionSettings("minmax", {"sparse+dense": [1.0, 0.5]}, confidence={"sparse+dense": [2.0, -1.0]})
    srv = Server(create_app(m3, None, retriever, ServeSettings(fusion=fusion, max_wait_ms=2)))
    try:
        query, k = "how to list files in a directory", 5
        reps = QueryReps.from_encode(m3.encode_queries([query], return_sparse=True, return_colbert_vecs=True))
        calibrated = retriever.search(reps, k, {"dense": 1.0, "sparse": 0.5}, candidate_k=k, normalization="minmax",
                                      confidence={"dense": 2.0, "sparse": -1.0})
        plain = retriever.search(reps, k, {"dense": 1.0, "sparse": 0.5}, candidate_k=k, normalization="minmax")
        assert not np.allclose(calibrated.scores, plain.scores)
        for body, ref in (({}, calibrated), ({"weights": [1.0, 0.5], "normalization": "minmax"}, plain)):
            r = httpx.post(f"{srv.url}/search", json={"query": query, "k": k, "mode": "sparse+dense", **body},
                           timeout=60)
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert [h["id"] for h in hits] == [DOC_IDS[i] for i in ref.rows[0].tolist() if i >= 0]
            np.testing.assert_allclose([h["score"] for h in hits], ref.scores[0][ref.rows[0] >= 0], atol=1e-5)
    finally:
        srv.stop()
