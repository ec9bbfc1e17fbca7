"""``GET /metrics``: Prometheus text format, one registry per app (several apps in one process stay apart)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("trine_queue_depth", "Requests waiting for the encoder", registry=r)
        self.batch_texts = Histogram("trine_batch_texts", "Texts per encoder call of the dynamic batcher",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("trine_batch_tokens", "Tokens per encoder call of the dynamic batcher",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.request_seconds = Histogram("trine_request_duration_seconds", "Request latency by route and status",
                                         ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("trine_tokens", "Tokens of the texts encoded or scored, by route", ["route"],
                              registry=r)
        self.texts = Counter("trine_texts", "Texts encoded or scored, by route", ["route"], registry=r)
        self.rejected = Counter("trine_rejected", "Requests refused with 429 because the queue was full",
                                registry=r)

    def observe_batch(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
