"""Prometheus metrics of the router (served on 127.0.0.1:--metrics-port by `pdserve serve`)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from router.planner import RecentSignals
from router.pools import WorkerSlot
from router.record import Outcome, RequestRecord

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
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Per request: (E2E - TTFT) / (output tokens - 1)",
            buckets=_LAT,
            registry=r,
        )
        self.queue = Histogram("pdserve_queue_seconds", "Admission until prefill start", buckets=_LAT, registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.kv_seconds = Histogram(
            "pdserve_kv_transfer_seconds", "KV export+transfer+import", buckets=_LAT, registry=r
        )
        self.kv_failures = Counter("pdserve_kv_transfer_failures", "Failed KV transfers", registry=r)
        self.requests = Counter("pdserve_requests", "Requests by outcome", ["outcome"], registry=r)
        self.kv_free = Gauge("pdserve_kv_free_pages", "Free KV pages per worker", ["worker", "role"], registry=r)
        self.kv_total = Gauge("pdserve_kv_total_pages", "KV pages per worker", ["worker", "role"], registry=r)
        self.migrations = Counter("pdserve_request_migrations", "Requests moved to another decode worker", registry=r)
        self.fallbacks = Counter("pdserve_prefill_fallbacks", "Prompts prefilled by a decode worker", registry=r)
        self.local_prefills = Counter(
            "pdserve_local_prefills", "Prompts whose short uncached part the decode worker prefilled", registry=r
        )
        self.cache_hit = Counter(
            "pdserve_prefix_cache_hit_tokens", "Prompt tokens served from a prefix cache", ["role"], registry=r
        )
        self.cache_queried = Counter(
            "pdserve_prefix_cache_queried_tokens", "Prompt tokens looked up in a prefix cache", ["role"], registry=r
        )
        self.kv_cached = Gauge(
            "pdserve_kv_cached_pages", "KV pages held by the prefix cache", ["worker", "role"], registry=r
        )
        self.kv_retries = Counter("pdserve_kv_transfer_retries", "KV sends retried after a failure", registry=r)
        self.lease_expired = Counter("pdserve_kv_lease_expired", "KV exports/reservations freed by lease", registry=r)
        self.restarts = Counter("pdserve_worker_restarts", "Worker processes restarted", ["role"], registry=r)
        self.spec_draft = Counter(
            "pdserve_spec_draft_tokens", "Draft tokens verified (speculative decoding)", registry=r
        )
        self.spec_accepted = Counter(
            "pdserve_spec_accepted_tokens", "Draft tokens accepted (speculative decoding)", registry=r
        )
        self.spec_per_step = Histogram(
            "pdserve_spec_accepted_tokens_per_step",
            "Draft tokens accepted per sequence and verify step",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=r,
        )
        self.pool_workers = Gauge("pdserve_pool_workers", "Workers in each pool", ["role"], registry=r)
        self.planner_decisions = Counter(
            "pdserve_planner_decisions",
            "Pool changes the planner decided",
            ["role", "direction", "reason"],
            registry=r,
        )
        self.recent = RecentSignals()  # what the planner reads (router.planner)
        self.pool_alive = Gauge("pdserve_pool_workers_alive", "Live workers in each pool", ["role"], registry=r)
        self.queued = Gauge(
            "pdserve_admission_queue_requests", "Requests waiting for room on the decode pool", registry=r
        )
        self._seen: dict[tuple[str, str], int] = {}  # (worker, counter) -> value already counted

    def count(self, outcome: Outcome) -> None:
        """A request that ended before it reached the router (refused by a front: bad input, bad key)."""
        self.requests.labels(outcome.value).inc()

    def observe_token(self, rec: RequestRecord, now: float, drafted: int = 0, accepted: int = 0) -> None:
        """A token leaves for the client: TTFT for the first, the inter-token gap for the others; the last token
        of a verified speculative run counts that step's draft and accepted tokens."""
        if drafted:
            self.spec_draft.inc(drafted)
            self.spec_accepted.inc(accepted)
            self.spec_per_step.observe(accepted)
        gap = rec.on_token(now, drafted, accepted)
        if gap is None:
            self.ttft.observe(now - rec.arrival)
        else:
            self.itl.observe(gap)
            self.recent.add_gap(now, gap)

    def observe_request(self, rec: RequestRecord) -> None:
        """Once per request, at its end: the outcome, E2E (finished requests), queue and KV hand-off."""
        outcome = rec.outcome or Outcome.CANCELLED
        self.requests.labels(outcome.value).inc()
        if outcome is Outcome.TRANSFER_FAILED:
            self.kv_failures.inc()
        if outcome is Outcome.FINISHED:
            self.e2e.observe(rec.e2e_s)
            if rec.completion_tokens > 1 and rec.ttft_s is not None:
                self.tpot.observe((rec.e2e_s - rec.ttft_s) / (rec.completion_tokens - 1))
        p = rec.prefill
        if p is not None and p.ok:
            self.recent.add_prefill(time.monotonic(), rec.prompt_tokens - p.cached_tokens, p.prefill_s)
            self.queue.observe(p.queue_s)
            self.kv_seconds.observe(p.transfer_s)
            self.kv_bytes.inc(p.kv_bytes)

    def observe_pools(self, workers: Iterable[WorkerSlot]) -> None:
        """Per-worker gauges, and the counters that workers keep (restarts, lease expiries, prefix-cache tokens)
        turned into deltas."""
        workers = list(workers)
        for role in {w.role.value for w in workers}:
            self.pool_workers.labels(role).set(sum(w.role.value == role for w in workers))
            self.pool_alive.labels(role).set(sum(w.role.value == role and w.alive for w in workers))
        for w in workers:
            role = w.role.value
            self.kv_free.labels(w.name, role).set(w.load.free_pages)
            self.kv_total.labels(w.name, role).set(w.load.total_pages)
            self.kv_cached.labels(w.name, role).set(w.load.cached_pages)
            self.restarts.labels(role).inc(self._delta(w.name, "restarts", w.restarts))
            self.lease_expired.inc(self._delta(w.name, "lease_expired", w.load.lease_expired))
            self.cache_hit.labels(role).inc(self._delta(w.name, "hit", w.load.prefix_hit_tokens))
            self.cache_queried.labels(role).inc(self._delta(w.name, "queried", w.load.prefix_queried_tokens))

    def _delta(self, worker: str, counter: str, value: int) -> int:
        """What a worker's counter grew by since the last call; a restarted worker counts from 0 again, so a
        value below the last one is all new."""
        seen = self._seen.get((worker, counter), 0)
        self._seen[worker, counter] = value
        return value - seen if value >= seen else value

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
