"""Prometheus metrics, declared in one place; each server owns its registry.

Every metric carries the model label; names follow Prometheus conventions (unit suffixes,
``_total`` for counters).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .batching import BatchStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, max_message_bytes: int | None = None) -> None:
        self.max_message_bytes = max_message_bytes  # responses over it fail to send
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gradcam_requests_total", "Requests received, by model, API and method.",
            ["model", "api", "method"], registry=self.registry,
        )
        self.errors = Counter(
            "gradcam_request_errors_total", "Requests that failed, by model and gRPC status.",
            ["model", "api", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "gradcam_request_duration_seconds", "Time to answer a request inside the server.",
            ["model", "api"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "gradcam_batch_size", "Rows per batch run by the runtime, by graph (forward or the "
            "explaining method).", ["model", "graph"], buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "gradcam_queue_duration_seconds", "Time requests waited in the batching queue.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.run_time = Histogram(
            "gradcam_inference_duration_seconds", "Runtime (onnxruntime) time per batch.",
            ["model", "graph"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.stopped = Counter(
            "gradcam_batches_stopped_total", "Batches stopped while running because every "
            "request in them was cancelled or past its deadline.", ["model", "graph"],
            registry=self.registry,
        )

    def track(self, name: str, documentation: str,
              read: Callable[[], list[tuple[str, int]]]) -> None:
        """Report ``read()``, (model, value) pairs, as the gauge `name` at every scrape."""
        self.registry.register(_ReadAtScrape(name, documentation, read))

    def observe_batch(self, model: str, graph: str, stats: BatchStats) -> None:
        self.batch_size.labels(model, graph).observe(stats.rows)
        self.run_time.labels(model, graph).observe(stats.run_seconds)
        for seconds in stats.queue_seconds:
            self.queue_time.labels(model).observe(seconds)
        if stats.stopped:
            self.stopped.labels(model, graph).inc()

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


class _ReadAtScrape:
    """A gauge by model whose values are read when it is scraped."""

    def __init__(self, name: str, documentation: str,
                 read: Callable[[], list[tuple[str, int]]]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self):
        family = GaugeMetricFamily(self._name, self._documentation, labels=["model"])
        for model, value in self._read():
            family.add_metric([model], value)
        yield family
