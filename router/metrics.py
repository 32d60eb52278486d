"""Prometheus metrics of the router (served on 127.0.0.1:--metrics-port by `pdserve serve`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per router (tests can create several in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pdserve_ttft_seconds", "Time to first token (server side)", buckets=_LAT, registry=r)
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds", "Gap between streamed tokens", buckets=_LAT, registry=r
        )
        self.e2e = Histogram("pdserve_e2e_latency_seconds", "Request latency", buckets=_LAT, registry=r)
        self.queue = Histogram("pdserve_queue_seconds", "Admission until prefill start", buckets=_LAT, registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.kv_seconds = Histogram(
            "pdserve_kv_transfer_seconds", "KV export+transfer+import", buckets=_LAT, registry=r
        )
        self.kv_failures = Counter("pdserve_kv_transfer_failures", "Failed KV transfers", registry=r)
        self.requests = Counter("pdserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.kv_free = Gauge("pdserve_kv_free_pages", "Free KV pages per worker", ["worker", "role"], registry=r)
        self.kv_total = Gauge("pdserve_kv_total_pages", "KV pages per worker", ["worker", "role"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
