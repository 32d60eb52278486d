"""`pdserve bench --fault`: kill (or stop) a worker of the server under test at a set time in the run, and
measure what the clients saw around it.

A spec is `ACTION:ROLE@SECONDS[+HOLD]`: `kill:decode@10` sends SIGKILL to the first live decode worker 10 s after
the run starts; `stop:prefill@5+3` sends SIGSTOP at 5 s and SIGCONT 3 s later. The worker's pid comes from the
server's `GetClusterStatus`, so the server must run on this machine (a loopback address).

Impact, from the client records: requests in flight at the fault, how many of all requests were migrated (the
server's `timings.migrations`), the median inter-token gap before the fault and the worst gap after it (the
spike a client felt), and the p99 of the gaps in the 10 s after it."""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.stats import RequestRecord
from kvtransfer.net import is_loopback

_SPEC = re.compile(r"^(kill|stop):(prefill|decode|colocated)@([0-9.]+)s?(?:\+([0-9.]+)s?)?$")
WINDOW_AFTER_S = 10.0


class FaultAction(enum.Enum):
    KILL = "kill"
    STOP = "stop"


@dataclass(frozen=True)
class FaultSpec:
    action: FaultAction
    role: str
    at_s: float
    hold_s: float = 0.0  # STOP: seconds until SIGCONT

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        m = _SPEC.match(text.strip())
        if m is None:
            raise ValueError(f"--fault {text!r}: expected kill|stop:prefill|decode|colocated@SECONDS[+HOLD]")
        hold = float(m[4] or 0)
        if m[1] == "stop" and hold <= 0:
            raise ValueError(f"--fault {text!r}: stop needs +HOLD seconds (when to SIGCONT)")
        return cls(FaultAction(m[1]), m[2], float(m[3]), hold)

    def __str__(self) -> str:
        return f"{self.action.value}:{self.role}@{self.at_s:g}s" + (f"+{self.hold_s:g}s" if self.hold_s else "")


@dataclass(frozen=True)
class FaultEvent:
    spec: FaultSpec
    at: float  # perf_counter time it was injected
    pid: int
    error: str = ""  # why it could not be injected ("" when it was)


@dataclass(frozen=True)
class FaultImpact:
    fault: str
    at_s: float  # seconds after the run started
    pid: int
    error: str
    in_flight: int
    migrated_requests: int
    itl_p50_before_ms: float | None
    worst_gap_after_ms: float | None
    itl_p99_after_ms: float | None


class FaultSchedule:
    """Injects the faults of one run on a thread of its own; `start(t0)` at the run's start, `join()` after it."""

    def __init__(self, specs: Sequence[FaultSpec], worker_pid: Callable[[str], int | None]) -> None:
        self.specs = sorted(specs, key=lambda s: s.at_s)
        self.worker_pid = worker_pid  # role -> pid of its first live worker (None: none)
        self.events: list[FaultEvent] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, t0: float) -> None:
        if self.specs:
            self._thread = threading.Thread(target=self._run, args=(t0,), name="bench-faults", daemon=True)
            self._thread.start()

    def join(self) -> list[FaultEvent]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        return self.events

    def _run(self, t0: float) -> None:
        for spec in self.specs:
            if self._stop.wait(max(0.0, t0 + spec.at_s - time.perf_counter())):
                return
            self.events.append(self._inject(spec))

    def _inject(self, spec: FaultSpec) -> FaultEvent:
        at = time.perf_counter()
        try:
            pid = self.worker_pid(spec.role)
        except Exception as e:  # the server did not answer: report it, keep the run going
            return FaultEvent(spec, at, 0, f"GetClusterStatus failed: {e}")
        if pid is None:
            return FaultEvent(spec, at, 0, f"no live {spec.role} worker")
        try:
            if spec.action is FaultAction.KILL:
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                threading.Timer(spec.hold_s, _resume, args=(pid,)).start()
        except OSError as e:
            return FaultEvent(spec, at, pid, f"{type(e).__name__}: {e}")
        return FaultEvent(spec, at, pid)


def _resume(pid: int) -> None:
    with contextlib.suppress(OSError):  # already gone
        os.kill(pid, signal.SIGCONT)


def fault_impact(event: FaultEvent, records: Sequence[RequestRecord], run_start: float) -> FaultImpact:
    t = event.at
    gaps = [(b, b - a) for r in records for a, b in itertools.pairwise(r.chunk_times)]
    before = [g for end, g in gaps if end < t]
    after = [g for end, g in gaps if t <= end <= t + WINDOW_AFTER_S]
    spanning = [g for end, g in gaps if end >= t and end - g <= t + WINDOW_AFTER_S]
    return FaultImpact(
        fault=str(event.spec),
        at_s=t - run_start,
        pid=event.pid,
        error=event.error,
        in_flight=sum(1 for r in records if r.sent <= t <= r.done),
        migrated_requests=sum(1 for r in records if r.migrations > 0),
        itl_p50_before_ms=1000.0 * float(np.median(before)) if before else None,
        worst_gap_after_ms=1000.0 * max(spanning) if spanning else None,
        itl_p99_after_ms=1000.0 * float(np.percentile(after, 99)) if after else None,
    )


def is_local(addr: str) -> bool:
    return is_loopback(addr.rpartition(":")[0])
