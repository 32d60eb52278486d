"""One request's record, kept by the router from arrival to outcome: every metric, the client's usage and timings,
and the request's trace are read from it, the same way for both fronts (gRPC and HTTP).

Lifecycle: a front validates the request and calls `Router.generate(req, deadline, arrival_s, traceparent)`; the
router makes the record, stamps each state (`mark`), each token (`on_token`) and each migration, and at the end
sets the `outcome` once (`finish`); then `Metrics.observe_request` and `Tracer.export` read it. Times are
`time.monotonic()` seconds; `wall_ns` turns one into epoch nanoseconds (traces)."""

from __future__ import annotations

import enum
import logging
import time
import uuid
from dataclasses import dataclass, field

from engine.messages import ErrorKind, PrefillResult, Role
from router.pools import WorkerSlot

log = logging.getLogger(__name__)
MAX_INTERNAL_CHARS = 200


class RequestState(enum.Enum):
    QUEUED = "queued"
    RESERVED = "reserved"
    PREFILLING = "prefilling"
    KV_TRANSFER = "kv_transfer"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Outcome(enum.Enum):
    """How a request ended: the `outcome` label of `pdserve_requests_total`, one value per way."""

    FINISHED = "finished"
    CANCELLED = "cancelled"  # the client went away
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the client's deadline passed first
    INVALID = "invalid"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    TRANSFER_FAILED = "transfer_failed"
    EVICTED = "evicted"
    INTERNAL = "internal"

    @classmethod
    def of(cls, kind: ErrorKind) -> Outcome:
        return cls(kind.value)


class RouterError(Exception):
    """A request's explicit outcome when it did not finish: `kind` picks the status on either front. An INTERNAL
    one carries an `error_id`, assigned here and logged once with the details; the client sees only
    `client_message` (short, with the id)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.error_id = uuid.uuid4().hex[:12] if kind is ErrorKind.INTERNAL else ""

    @property
    def client_message(self) -> str:
        if self.kind is ErrorKind.INTERNAL:
            return f"{self.message[:MAX_INTERNAL_CHARS]} (error id {self.error_id})"
        return self.message

    @classmethod
    def bug(cls, request_id: str) -> RouterError:
        """Inside an `except` on a request's path: the exception is a bug. Log its traceback under a new error
        id and return the INTERNAL error the client gets (never the traceback)."""
        err = cls(ErrorKind.INTERNAL, "internal error")
        log.exception("request %s failed (error id %s)", request_id, err.error_id)
        return err


@dataclass
class Migration:
    """One move of a request to a new attempt: when the old one was found lost, why, and when the new attempt
    streamed its first token (None until then)."""

    at: float
    reason: str
    tokens_sent: int  # output tokens the client already had
    resumed_at: float | None = None


@dataclass
class RequestRecord:
    """The state and time-stamped transitions of one request (monotonic seconds)."""

    request_id: str
    prompt_tokens: int
    arrival: float = field(default_factory=time.monotonic)  # when the front received it (TTFT and E2E start here)
    traceparent: str = ""  # the client's W3C trace context, if it sent one
    state: RequestState = RequestState.QUEUED
    stamps: dict[RequestState, float] = field(default_factory=dict)
    completion_tokens: int = 0
    prefill: PrefillResult | None = None
    prefill_done_at: float | None = None  # when the prefill worker's result arrived (the KV is in)
    migrations: int = 0
    spec_drafted: int = 0  # speculative decoding: draft tokens verified for this request, and accepted
    spec_accepted: int = 0
    migration_log: list[Migration] = field(default_factory=list)
    queue_wait_s: float = 0.0
    first_token_at: float | None = None  # when the client's first token was ready (TTFT), across attempts
    last_token_at: float | None = None
    attempt_id: str = ""  # the worker-side id of the current attempt
    page_hashes: tuple[int, ...] = ()  # of the current attempt's tokens (cache-aware placement)
    decode_cached: int = 0  # leading tokens the decode worker already held (its reservation's answer)
    cached_tokens: int = 0  # prompt tokens not prefilled for this request: taken from a prefix cache
    workers: dict[Role, WorkerSlot] = field(default_factory=dict)  # who holds the current attempt
    outcome: Outcome | None = None
    ended_at: float | None = None
    finish_reason: str = ""
    _wall0_ns: int = field(default_factory=time.time_ns)
    _mono0: float = field(default_factory=time.monotonic)

    def mark(self, state: RequestState) -> None:
        """Enter `state`; `stamps` keeps the first entry into each (a migrated request's later attempts are
        in `migration_log`)."""
        self.state = state
        self.stamps.setdefault(state, time.monotonic())

    def on_token(self, now: float, drafted: int = 0, accepted: int = 0) -> float | None:
        """A token leaves for the client at `now` (the last of a verified run carries that step's draft and
        accepted counts); the gap since the previous one (None for the first)."""
        self.spec_drafted += drafted
        self.spec_accepted += accepted
        gap = None if self.last_token_at is None else now - self.last_token_at
        if self.first_token_at is None:
            self.first_token_at = now
        if self.migration_log and self.migration_log[-1].resumed_at is None:
            self.migration_log[-1].resumed_at = now
        self.last_token_at = now
        self.completion_tokens += 1
        return gap

    def finish(self, outcome: Outcome, finish_reason: str = "") -> None:
        """Set the outcome once (a later call changes nothing)."""
        if self.outcome is None:
            self.outcome, self.ended_at, self.finish_reason = outcome, time.monotonic(), finish_reason

    @property
    def e2e_s(self) -> float:
        return (self.ended_at or time.monotonic()) - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    def wall_ns(self, t: float) -> int:
        """Epoch nanoseconds of monotonic time `t`."""
        return self._wall0_ns + int((t - self._mono0) * 1e9)
