"""Worker pools as the router sees them: one typed client per worker, liveness, load, and the placement policies.

Policies are pure functions over `WorkerSlot`s (unit-tested without Ray): a prefill worker with the fewest queued
prompt tokens; decode workers ordered by fewest active requests, then most free KV pages. Cache-aware (given the
prompt's page hashes): the worker holding the longest prefix of the prompt goes first, unless its load exceeds the
least-loaded worker's by more than a threshold (SGLang's cache-aware policy). The router's view of what a worker
holds (`WorkerSlot.prefixes`) is the worker's own report from the last refresh (so evictions are seen), plus what
the router placed there since.

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
from engine.protocols import DecodeAPI, PrefillAPI, WorkerAPI

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
    prefixes: set[int] = field(default_factory=set)  # page hashes it reported holding at the last refresh
    placed: dict[int, float] = field(default_factory=dict)  # page hashes the router sent since -> when (monotonic)
    refused: str = ""  # why this process is kept out of rotation (its KV cache cannot take the cluster's KV)
    draining: bool = False  # the planner is removing it: placement skips it, what runs finishes or migrates
    role_lock: threading.Lock = field(default_factory=threading.Lock)  # one role change at a time (switch, restart)

    @property
    def kv_address(self) -> str:
        return self.info.kv_address if self.info is not None else ""

    @property
    def available(self) -> bool:
        """Alive, not draining and not cooling down: placement may pick it."""
        return self.alive and not self.draining and time.monotonic() >= self.cooldown_until


PLACED_TTL_S = 10.0  # a prompt the router sent counts as cached there this long, until the worker reports it


def cached_pages(w: WorkerSlot, hashes: Sequence[int]) -> int:
    """How many leading pages of a prompt (its page hashes) the router believes `w` holds."""
    n = 0
    for h in hashes:
        if h not in w.prefixes and h not in w.placed:
            break
        n += 1
    return n


def note_placed(w: WorkerSlot, hashes: Sequence[int]) -> None:
    """The router sent a prompt with these page hashes to `w`: it will hold them once the request is done."""
    now = time.monotonic()
    w.placed.update(dict.fromkeys(hashes, now))


def _cache_first(order: list[WorkerSlot[C]], hashes: Sequence[int], load, threshold: float) -> list[WorkerSlot[C]]:
    """`order` (least loaded first) with the worker holding the longest prefix moved to the front, unless its
    load exceeds the least-loaded worker's by more than `threshold`."""
    if not order or not hashes:
        return order
    best = max(order, key=lambda w: cached_pages(w, hashes))  # ties: the least loaded (first in order)
    if cached_pages(best, hashes) == 0 or load(best) - load(order[0]) > threshold:
        return order
    return [best, *(w for w in order if w is not best)]


def pick_prefill(
    workers: Sequence[WorkerSlot[PrefillAPI]], hashes: Sequence[int] = (), balance_tokens: int = 1024
) -> WorkerSlot[PrefillAPI] | None:
    """The live prefill worker with the fewest queued prompt tokens (ties: first), or the one holding the longest
    prefix of the prompt when it has at most `balance_tokens` more queued."""
    live = sorted((w for w in workers if w.available), key=lambda w: w.queued_tokens)
    order = _cache_first(live, hashes, lambda w: w.queued_tokens, balance_tokens)
    return order[0] if order else None


def decode_order(
    workers: Sequence[WorkerSlot[C]], hashes: Sequence[int] = (), balance_requests: int = 4
) -> list[WorkerSlot[C]]:
    """Live decode (or colocated) workers, best first: fewest requests the router has placed there, then most
    free pages. `active` is exact and immediate; the pages are as of the last refresh (up to a poll interval
    old), so ordering by them first herds a burst onto one worker. A worker without room answers BUSY and the
    next one is asked. The worker holding the longest prefix of the prompt goes first when it has at most
    `balance_requests` more active requests than the least loaded."""
    order = sorted((w for w in workers if w.available), key=lambda w: (w.active, -w.load.free_pages))
    return _cache_first(order, hashes, lambda w: w.active, balance_requests)


@dataclass
class Pools:
    prefill: list[WorkerSlot[PrefillAPI]] = field(default_factory=list)
    decode: list[WorkerSlot[DecodeAPI]] = field(default_factory=list)
    colocated: list[WorkerSlot[DecodeAPI]] = field(default_factory=list)  # reserve + prefill_local, like decode
    lock: threading.Lock = field(default_factory=threading.Lock)
    kv_dtype: str = ""  # the cluster's KV cache dtype; "" = the first worker described sets it

    @property
    def workers(self) -> list[WorkerSlot]:
        return [*self.prefill, *self.decode, *self.colocated]

    def pool(self, role: Role) -> list[WorkerSlot]:
        return {Role.PREFILL: self.prefill, Role.DECODE: self.decode, Role.COLOCATED: self.colocated}[role]

    def add(self, w: WorkerSlot) -> None:
        """A worker joins its pool while serving (a new list: placement iterating the old one is undisturbed)."""
        with self.lock:
            setattr(self, w.role.value, [*self.pool(w.role), w])

    def remove(self, w: WorkerSlot) -> None:
        with self.lock:
            setattr(self, w.role.value, [x for x in self.pool(w.role) if x is not w])

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
                w.placed.clear()  # a new process holds nothing
                w.refused = self._admission_error(info)
                if w.refused:
                    log.error("%s is refused: %s", w.name, w.refused)
            if w.refused:
                w.alive = False
                return
            if not w.alive:
                log.info("%s is back", w.name)
            w.alive = True
            w.load = load
            w.queued_tokens = load.queued_tokens
            w.prefixes = set(load.cached_prefixes)  # the worker's own view: what it evicted is gone
            if w.placed:
                cutoff = time.monotonic() - PLACED_TTL_S
                w.placed = {h: t for h, t in w.placed.items() if t > cutoff and h not in w.prefixes}

    def _admission_error(self, info: WorkerInfo) -> str:
        """Why a newly described worker process cannot join (lock held): its KV cache dtype differs from the
        cluster's, so no KV could move between it and the other pool. "" = admitted."""
        if not info.kv_dtype:
            return ""
        if not self.kv_dtype:
            self.kv_dtype = info.kv_dtype
        if info.kv_dtype == self.kv_dtype:
            return ""
        return (
            f"its KV cache is {info.kv_dtype} but the cluster's is {self.kv_dtype} "
            f"(restart it with --kv-cache-dtype {self.kv_dtype})"
        )


def pools_live(pools: Pools) -> bool:
    """Every pool the cluster has holds at least one live worker (HTTP /health)."""
    present = [p for p in (pools.prefill, pools.decode, pools.colocated) if p]
    return bool(present) and all(any(w.alive for w in p) for p in present)


class PoolMonitor:
    """Watches every worker on a thread of its own (a worker that does not answer never delays the others):
    its load every `interval_s`, its new incarnation after a restart. A worker whose load call does not return
    within the client's call timeout (the stall timeout: a SIGSTOPped process, a wedged engine) is marked dead
    until it answers again; streams from a dead worker end, and their requests migrate. Workers the planner adds
    or removes while serving are watched or unwatched with `watch` / `unwatch`."""

    def __init__(self, pools: Pools, interval_s: float = 0.5) -> None:
        self.pools = pools
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._watching: dict[str, threading.Event] = {}

    def start(self) -> PoolMonitor:
        for w in self.pools.workers:
            self.watch(w)
        return self

    def watch(self, w: WorkerSlot) -> None:
        done = self._watching[w.name] = threading.Event()
        threading.Thread(target=self._watch, args=(w, done), name=f"watch-{w.name}", daemon=True).start()

    def unwatch(self, w: WorkerSlot) -> None:
        done = self._watching.pop(w.name, None)
        if done is not None:
            done.set()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, w: WorkerSlot, done: threading.Event) -> None:
        while not self._stop.is_set() and not done.is_set():
            observed = _observe(w)
            if observed is not None and observed[1] is not None and observed[1].role is not w.role:
                observed = _switch_back(w, done)  # a RoleWorker restarted by Ray in the role it was created with
            if done.is_set():
                return
            self.pools._apply(w, observed)
            self._stop.wait(self.interval_s)


def _switch_back(w: WorkerSlot, done: threading.Event) -> tuple[WorkerLoad, WorkerInfo | None] | None:
    """Switch a restarted `RoleWorker` back to its slot's role, unless the slot was given up meanwhile (the
    planner moved the worker to the other pool: its own switch holds `role_lock` while it unwatches and switches)."""
    with w.role_lock:
        if done.is_set():
            return None
        try:
            log.warning("%s restarted in its first role; switching it back to %s", w.name, w.role.value)
            info = w.client.switch(w.role)
            return w.client.load(), info
        except Exception:  # not answering now: observed again at the next interval
            return None


def _observe(w: WorkerSlot) -> tuple[WorkerLoad, WorkerInfo | None] | None:
    """(load, info if the process is new to us) or None when the worker does not answer."""
    try:
        load = w.client.load()
        if w.info is not None and w.info.incarnation == load.incarnation:
            return load, None
        return load, w.client.describe()
    except Exception:  # any failure (died, restarting, timeout, a broken engine) means "not alive now"
        return None
