"""Worker pools as the router sees them: one typed client per worker, liveness, load, and the placement policies.

Policies are pure functions over `WorkerSlot`s (unit-tested without Ray): a prefill worker with the fewest queued
prompt tokens; decode workers ordered by fewest active requests, then most free KV pages.

`refresh()` asks every worker for its `WorkerLoad`; a worker answering with a new `incarnation` (Ray restarted
its process) is described again, so its new KV address is learned once per process, never per request."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from engine.messages import Role, WorkerInfo, WorkerLoad
from engine.protocols import ColocatedAPI, DecodeAPI, PrefillAPI, WorkerAPI

C = TypeVar("C", bound=WorkerAPI)
log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerSlot(Generic[C]):
    """Router-side view of one worker. `active` / `queued_tokens` are kept by the router as it assigns work;
    `queued_tokens` is corrected from the worker's own load on each refresh."""

    name: str
    role: Role
    client: C
    alive: bool = True
    info: WorkerInfo | None = None
    load: WorkerLoad = field(default_factory=lambda: WorkerLoad(""))
    active: int = 0
    queued_tokens: int = 0
    restarts: int = 0
    failures: int = 0  # calls failed in a row
    cooldown_until: float = 0.0  # out of rotation until then (monotonic), after `failures` reached the threshold

    @property
    def kv_address(self) -> str:
        return self.info.kv_address if self.info is not None else ""

    @property
    def available(self) -> bool:
        """Alive and not cooling down: placement may pick it."""
        return self.alive and time.monotonic() >= self.cooldown_until


def pick_prefill(workers: Sequence[WorkerSlot[PrefillAPI]]) -> WorkerSlot[PrefillAPI] | None:
    """The live prefill worker with the fewest queued prompt tokens (ties: first)."""
    live = [w for w in workers if w.available]
    return min(live, key=lambda w: w.queued_tokens) if live else None


def decode_order(workers: Sequence[WorkerSlot[C]]) -> list[WorkerSlot[C]]:
    """Live decode (or colocated) workers, best first: fewest requests the router has placed there, then most
    free pages. `active` is exact and immediate; the pages are as of the last refresh (up to a poll interval
    old), so ordering by them first herds a burst onto one worker. A worker without room answers BUSY and the
    next one is asked."""
    return sorted((w for w in workers if w.available), key=lambda w: (w.active, -w.load.free_pages))


@dataclass
class Pools:
    prefill: list[WorkerSlot[PrefillAPI]] = field(default_factory=list)
    decode: list[WorkerSlot[DecodeAPI]] = field(default_factory=list)
    colocated: list[WorkerSlot[ColocatedAPI]] = field(default_factory=list)  # reserve + prefill_local, like decode
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def workers(self) -> list[WorkerSlot]:
        return [*self.prefill, *self.decode, *self.colocated]

    breaker_failures: int = 3  # calls failed in a row that take a worker out of rotation ...
    breaker_cooldown_s: float = 10.0  # ... for this long

    def mark_dead(self, w: WorkerSlot) -> None:
        with self.lock:
            w.alive = False

    def record(self, w: WorkerSlot, ok: bool) -> None:
        """Count a call's outcome; `breaker_failures` failures in a row start a cool-down."""
        with self.lock:
            w.failures = 0 if ok else w.failures + 1
            if w.failures >= self.breaker_failures:
                w.failures = 0
                w.cooldown_until = time.monotonic() + self.breaker_cooldown_s
                log.warning(
                    "%s failed %d calls in a row: out of rotation for %.0f s",
                    w.name,
                    self.breaker_failures,
                    self.breaker_cooldown_s,
                )

    def refresh(self) -> None:
        """Ask every worker for its load (concurrently); one that fails to answer is marked dead until it answers
        again. A new incarnation is described again and counted as a restart."""
        workers = self.workers
        if not workers:
            return
        with cf.ThreadPoolExecutor(len(workers)) as ex:
            for w, fut in [(w, ex.submit(_observe, w)) for w in workers]:
                self._apply(w, fut.result())

    def _apply(self, w: WorkerSlot, observed: tuple[WorkerLoad, WorkerInfo | None] | None) -> None:
        with self.lock:
            if observed is None:
                if w.alive:
                    log.warning("%s does not answer: out of rotation until it does", w.name)
                w.alive = False
                return
            load, info = observed
            if info is not None:
                if w.info is not None:
                    w.restarts += 1
                    log.warning("%s restarted (pid %d, KV at %s)", w.name, info.pid, info.kv_address or "-")
                w.info = info
            if not w.alive:
                log.info("%s is back", w.name)
            w.alive = True
            w.load = load
            w.queued_tokens = load.queued_tokens


class PoolMonitor:
    """Watches every worker on a thread of its own (a worker that does not answer never delays the others):
    its load every `interval_s`, its new incarnation after a restart. A worker whose load call does not return
    within the client's call timeout (the stall timeout: a SIGSTOPped process, a wedged engine) is marked dead
    until it answers again; streams from a dead worker end, and their requests migrate."""

    def __init__(self, pools: Pools, interval_s: float = 0.5) -> None:
        self.pools = pools
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, args=(w,), name=f"watch-{w.name}", daemon=True) for w in pools.workers
        ]

    def start(self) -> PoolMonitor:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, w: WorkerSlot) -> None:
        while not self._stop.is_set():
            self.pools._apply(w, _observe(w))
            self._stop.wait(self.interval_s)


def _observe(w: WorkerSlot) -> tuple[WorkerLoad, WorkerInfo | None] | None:
    """(load, info if the process is new to us) or None when the worker does not answer."""
    try:
        load = w.client.load()
        fresh = w.info is None or w.info.incarnation != load.incarnation
        return load, (w.client.describe() if fresh else None)
    except Exception:  # any failure (died, restarting, timeout, a broken engine) means "not alive now"
        return None
