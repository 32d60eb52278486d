"""Per-request timelines -> serving metrics, with the definitions vLLM's and SGLang's serving benchmarks use.

- TTFT: first token received - request sent.
- TPOT: (E2E - TTFT) / (output tokens - 1); requests with a single output token have no TPOT.
- ITL: every gap between consecutive streamed messages that carry tokens, pooled over all requests.
- E2E: stream finished - request sent.
- Throughputs divide by the run's duration (first send to last finish); goodput counts only the completed requests
  that meet every SLO given (an SLO on TPOT is met by a single-token request, which has no TPOT).
Failed requests are counted by gRPC status code name and never enter the latency statistics.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

SERVER_FIELDS = (
    "queue_s",
    "prefill_s",
    "kv_transfer_s",
    "kv_export_s",
    "kv_wire_s",
    "kv_import_s",
    "kv_tail_s",
    "first_token_s",
    "decode_s",
    "e2e_s",
)


@dataclass(frozen=True)
class ServerTimings:
    """The server's own breakdown of one request (the final response's `timings`), seconds."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0  # the send including the import (the three below: export, wire, import)
    kv_export_s: float = 0.0
    kv_wire_s: float = 0.0
    kv_import_s: float = 0.0
    kv_tail_s: float = 0.0  # end of prefill until the decode worker holds the KV
    first_token_s: float = 0.0
    decode_s: float = 0.0
    e2e_s: float = 0.0


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request. Times are `time.perf_counter()` seconds on one clock."""

    sent: float
    done: float
    chunk_times: tuple[float, ...] = ()  # receive time of each streamed message carrying tokens
    output_tokens: int = 0
    prompt_tokens: int = 0
    target_output_len: int = 0
    error: str | None = None  # gRPC status code name (or a client-side exception name); None = completed
    error_detail: str = ""
    server: ServerTimings | None = None
    migrations: int = 0  # times the server moved the request to another decode attempt
    cached_tokens: int = 0  # prompt tokens the server took from a prefix cache (usage.cached_prompt_tokens)
    kv_bytes: int = 0  # KV bytes the server moved prefill -> decode for it (timings.kv_transfer_bytes)
    spec_drafted: int = 0  # speculative decoding: draft tokens the server verified for it, and accepted
    spec_accepted: int = 0
    output_ids: tuple[int, ...] = ()  # the tokens it streamed (multi-turn histories, same-token checks)
    prompt_ids: tuple[int, ...] = ()  # the prompt as the server tokenized it (gRPC; the mismatch margin check)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; None = not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--slo {f.name.removesuffix('_ms')}: must be a positive number of ms, got {v}")

    @property
    def given(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """`ttft=MS,tpot=MS[,e2e=MS]`."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, val = part.strip().partition("=")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"--slo: expected ttft=MS,tpot=MS,e2e=MS (any of them), got {part.strip()!r}")
            if key in values:
                raise ValueError(f"--slo: {key} given twice")
            try:
                values[key] = float(val)
            except ValueError:
                raise ValueError(f"--slo {key}: not a number: {val!r}") from None
        return cls(**{f"{k}_ms": v for k, v in values.items()})

    def met_by(self, r: RequestRecord) -> bool:
        ttft, tpot = r.ttft, r.tpot
        if self.ttft_ms is not None and (ttft is None or ttft * 1000.0 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and tpot is not None and tpot * 1000.0 > self.tpot_ms:
            return False
        return self.e2e_ms is None or r.e2e * 1000.0 <= self.e2e_ms


@dataclass(frozen=True)
class Percentiles:
    """Summary of one latency distribution, milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    count: int

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> Percentiles | None:
        """None for an empty sample (e.g. nothing completed)."""
        if len(values_s) == 0:
            return None
        a = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(float(a.mean()), float(p50), float(p90), float(p99), float(a.min()), float(a.max()), len(a))


@dataclass(frozen=True)
class ServerBreakdown:
    """Means over completed requests of the server-reported timings, seconds."""

    queue_s: float
    prefill_s: float
    kv_transfer_s: float
    kv_export_s: float
    kv_wire_s: float
    kv_import_s: float
    kv_tail_s: float
    first_token_s: float
    decode_s: float
    e2e_s: float
    count: int


@dataclass(frozen=True)
class RunMetrics:
    completed: int
    failed: int
    failures_by_code: dict[str, int]
    migrated: int  # completed requests the server migrated at least once
    failure_examples: dict[str, str]  # code -> first error message seen
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    expected_output_tokens: int  # sum of the target output lengths of the completed requests
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    goodput: float | None  # requests/s meeting every SLO given; None without SLOs
    slo_attainment: float | None  # fraction of all requests meeting every SLO
    ttft_ms: Percentiles | None
    tpot_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None
    server_breakdown_s: ServerBreakdown | None
    cached_token_fraction: float = 0.0  # prompt tokens served from a prefix cache / all prompt tokens
    kv_bytes_per_request: float = 0.0  # mean KV bytes moved prefill -> decode per completed request
    spec_drafted: int = 0  # draft tokens verified over the completed requests (speculative decoding)
    spec_accepted: int = 0  # of those, accepted


def server_breakdown(records: Sequence[RequestRecord]) -> ServerBreakdown | None:
    timings = [r.server for r in records if r.ok and r.server is not None]
    if not timings:
        return None
    means = {k: float(np.mean([getattr(t, k) for t in timings])) for k in SERVER_FIELDS}
    return ServerBreakdown(**means, count=len(timings))


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, slo: SLO | None = None) -> RunMetrics:
    """Aggregate one run. `duration_s` is the wall time from the first send to the last finish."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    slo = slo or SLO()
    ok = [r for r in records if r.ok]
    bad = [r for r in records if not r.ok]
    codes = Counter(r.error for r in bad)
    examples: dict[str, str] = {}
    for r in bad:
        examples.setdefault(str(r.error), r.error_detail)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(1 for r in ok if slo.met_by(r)) if slo.given else None
    return RunMetrics(
        completed=len(ok),
        failed=len(bad),
        failures_by_code={str(k): v for k, v in sorted(codes.items())},
        migrated=sum(1 for r in ok if r.migrations > 0),
        failure_examples=examples,
        duration_s=duration_s,
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        expected_output_tokens=sum(r.target_output_len for r in ok),
        request_throughput=len(ok) / duration_s,
        output_token_throughput=out_tokens / duration_s,
        total_token_throughput=(in_tokens + out_tokens) / duration_s,
        goodput=None if good is None else good / duration_s,
        slo_attainment=None if good is None or not records else good / len(records),
        ttft_ms=Percentiles.of_seconds([t for r in ok if (t := r.ttft) is not None]),
        tpot_ms=Percentiles.of_seconds([t for r in ok if (t := r.tpot) is not None]),
        itl_ms=Percentiles.of_seconds([g for r in ok for g in r.itls]),
        e2e_ms=Percentiles.of_seconds([r.e2e for r in ok]),
        server_breakdown_s=server_breakdown(records),
        cached_token_fraction=sum(r.cached_tokens for r in ok) / in_tokens if in_tokens else 0.0,
        kv_bytes_per_request=sum(r.kv_bytes for r in ok) / len(ok) if ok else 0.0,
        spec_drafted=sum(r.spec_drafted for r in ok),
        spec_accepted=sum(r.spec_accepted for r in ok),
    )


def latency_samples_ms(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per-request TTFT/TPOT/E2E of the completed requests, ms (for CDF plots and the raw JSON)."""
    ok = [r for r in records if r.ok]
    return {
        "ttft_ms": [t * 1000.0 for r in ok if (t := r.ttft) is not None],
        "tpot_ms": [t * 1000.0 for r in ok if (t := r.tpot) is not None],
        "e2e_ms": [r.e2e * 1000.0 for r in ok],
    }
