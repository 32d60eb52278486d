"""Worker pools as the router sees them: one typed client per worker, liveness, load, and the placement policies.

Policies are pure functions over `WorkerSlot`s (unit-tested without Ray): a prefill worker with the fewest queued
prompt tokens; decode workers ordered by most free KV pages, then fewest active requests.

`refresh()` asks every worker for its `WorkerLoad`; a worker answering with a new `incarnation` (Ray restarted
its process) is described again, so its new KV address is learned once per process, never per request."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from engine.messages import Role, WorkerInfo, WorkerLoad
from engine.protocols import ColocatedAPI, DecodeAPI, PrefillAPI, WorkerAPI

C = TypeVar("C", bound=WorkerAPI)


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

    @property
    def kv_address(self) -> str:
        return self.info.kv_address if self.info is not None else ""


def pick_prefill(workers: Sequence[WorkerSlot[PrefillAPI]]) -> WorkerSlot[PrefillAPI] | None:
    """The live prefill worker with the fewest queued prompt tokens (ties: first)."""
    live = [w for w in workers if w.alive]
    return min(live, key=lambda w: w.queued_tokens) if live else None


def decode_order(workers: Sequence[WorkerSlot[C]]) -> list[WorkerSlot[C]]:
    """Live decode (or colocated) workers, best first: most free pages, then fewest active requests."""
    return sorted((w for w in workers if w.alive), key=lambda w: (-w.load.free_pages, w.active))


@dataclass
class Pools:
    prefill: list[WorkerSlot[PrefillAPI]] = field(default_factory=list)
    decode: list[WorkerSlot[DecodeAPI]] = field(default_factory=list)
    colocated: list[WorkerSlot[ColocatedAPI]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def workers(self) -> list[WorkerSlot]:
        return [*self.prefill, *self.decode, *self.colocated]

    def mark_dead(self, w: WorkerSlot) -> None:
        with self.lock:
            w.alive = False

    def refresh(self) -> None:
        """Ask every worker for its load (concurrently); one that fails to answer is marked dead until it answers
        again. A new incarnation is described again and counted as a restart."""
        workers = self.workers
        if not workers:
            return
        with cf.ThreadPoolExecutor(len(workers)) as ex:
            for w, fut in [(w, ex.submit(_observe, w)) for w in workers]:
                observed = fut.result()
                with self.lock:
                    if observed is None:
                        w.alive = False
                        continue
                    load, info = observed
                    if info is not None:
                        w.restarts += w.info is not None
                        w.info = info
                    w.alive = True
                    w.load = load
                    w.queued_tokens = load.queued_tokens


def _observe(w: WorkerSlot) -> tuple[WorkerLoad, WorkerInfo | None] | None:
    """(load, info if the process is new to us) or None when the worker does not answer."""
    try:
        load = w.client.load()
        fresh = w.info is None or w.info.incarnation != load.incarnation
        return load, (w.client.describe() if fresh else None)
    except Exception:  # any failure (died, restarting, timeout, a broken engine) means "not alive now"
        return None
