"""Worker pools as the router sees them: Ray actor handles, liveness, load, and the placement policies.

Policies are pure functions over `WorkerState`s (unit-tested without Ray): a prefill worker with the fewest
queued prompt tokens; decode workers ordered by most free KV pages, then fewest running sequences."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("prefill", "decode", "colocated")


@dataclass
class WorkerState:
    """Router-side view of one worker. `queued_tokens`/`active` are kept by the router as it assigns work and
    corrected from the worker's own `load()` on each refresh."""

    name: str
    role: str
    handle: Any = None
    alive: bool = True
    queued_tokens: int = 0
    active: int = 0
    free_pages: int = 0
    total_pages: int = 0
    running: int = 0


def pick_prefill(workers: Sequence[WorkerState]) -> WorkerState | None:
    """The live prefill worker with the fewest queued prompt tokens (ties: first)."""
    live = [w for w in workers if w.alive]
    return min(live, key=lambda w: w.queued_tokens) if live else None


def decode_order(workers: Sequence[WorkerState]) -> list[WorkerState]:
    """Live decode (or colocated) workers, best first: most free pages, then fewest active requests."""
    return sorted((w for w in workers if w.alive), key=lambda w: (-w.free_pages, w.active))


@dataclass
class Pools:
    workers: list[WorkerState] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def role(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers if w.role == role]

    def mark_dead(self, w: WorkerState) -> None:
        with self.lock:
            w.alive = False

    def refresh(self, ray: Any, timeout_s: float = 5.0) -> None:
        """Ask every worker for its load; one that fails to answer is marked dead until it answers again."""
        refs = [(w, w.handle.load.remote()) for w in self.workers]
        for w, ref in refs:
            try:
                load = ray.get(ref, timeout=timeout_s)
            except Exception:  # any failure (died, restarting, timeout) means "not alive now"
                self.mark_dead(w)
                continue
            with self.lock:
                w.alive = True
                w.free_pages = int(load.get("free_pages", 0))
                w.total_pages = int(load.get("total_pages", 0))
                w.running = int(load.get("running", 0))
                if "queued_tokens" in load:
                    w.queued_tokens = int(load["queued_tokens"])
