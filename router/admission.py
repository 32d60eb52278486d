"""`AdmissionQueue`: requests that find the decode pool full (or empty) wait here, in order, for a bounded time.

Only the request at the head of the queue tries to get in; the rest wait behind it, so arrivals never overtake
requests that were already waiting. A try answers one of three ways: admitted (the queue hands back its
value), `Busy` (every worker is full: wait up to `max_wait_s`), or `NoWorker` (no worker is alive: wait up to
`recovery_timeout_s` for one to come back). Past those bounds, or past the client's deadline, the request ends
with an explicit status; past `max_waiting` queued requests (while the pool is full) a new one is refused at once. Nothing waits without
bound. `notify()` (a request finished somewhere) wakes the head early; it also retries every `poll_s`."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.messages import ErrorKind

T = TypeVar("T")


@dataclass(frozen=True)
class Busy:
    reason: str


@dataclass(frozen=True)
class NoWorker:
    reason: str


class AdmissionRefused(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class QueueLimits:
    max_waiting: int = 256
    max_wait_s: float = 30.0
    recovery_timeout_s: float = 60.0
    poll_s: float = 0.1


class AdmissionQueue(Generic[T]):
    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self._waiting: deque[object] = deque()
        self._cond = threading.Condition()
        self._full = False  # the head's last try found no room: only then is the queue bound enforced

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def admit(self, attempt: Callable[[], T | Busy | NoWorker], deadline: float | None = None) -> tuple[T, float]:
        """Call `attempt` (only ever at the head of the queue) until it admits; (its value, seconds waited).

        Raises `AdmissionRefused`: BUSY when the queue is full or the wait ran out, UNAVAILABLE when no worker
        came back within the recovery timeout."""
        t0 = time.monotonic()
        ticket = object()
        with self._cond:
            if self._full and len(self._waiting) >= self.limits.max_waiting:
                raise AdmissionRefused(ErrorKind.BUSY, f"admission queue full ({self.limits.max_waiting} waiting)")
            self._waiting.append(ticket)
        busy_until = t0 + self.limits.max_wait_s
        down_since: float | None = None
        try:
            while True:
                with self._cond:
                    while self._waiting[0] is not ticket:
                        self._wait(deadline, busy_until)
                got = attempt()
                now = time.monotonic()
                self._full = isinstance(got, Busy | NoWorker)
                if isinstance(got, NoWorker):
                    down_since = down_since if down_since is not None else now
                    if now - down_since > self.limits.recovery_timeout_s:
                        raise AdmissionRefused(ErrorKind.UNAVAILABLE, got.reason)
                    limit = down_since + self.limits.recovery_timeout_s
                elif isinstance(got, Busy):
                    down_since = None
                    if now > busy_until:
                        raise AdmissionRefused(
                            ErrorKind.BUSY, f"{got.reason}; waited {now - t0:.1f} s (--max-queue-wait-s)"
                        )
                    limit = busy_until
                else:
                    return got, now - t0
                if deadline is not None and now >= deadline:
                    raise AdmissionRefused(ErrorKind.UNAVAILABLE, f"deadline passed while waiting: {got.reason}")
                with self._cond:
                    self._cond.wait(min(self.limits.poll_s, max(0.0, limit - now)))
        finally:
            with self._cond:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def _wait(self, deadline: float | None, busy_until: float) -> None:
        """Wait behind the head (lock held); give up at the queue bound or the client's deadline."""
        now = time.monotonic()
        limit = min(busy_until + self.limits.recovery_timeout_s, deadline if deadline is not None else float("inf"))
        if now >= limit:
            raise AdmissionRefused(ErrorKind.BUSY, f"waited {self.limits.max_wait_s:g} s behind other requests")
        self._cond.wait(min(self.limits.poll_s, limit - now))
