"""The planner's hands (#29): `Scaler` starts and drains workers while serving; `PlannerLoop` ticks the planner
(`router.planner`) with the router's signals and carries out its decisions.

Scaling up: `grow(role)` creates a worker actor (`router.cluster.start_worker`); its slot joins the pool at once,
out of rotation until the worker answers (it loads its model, compiled from the shared cache; on a `ray up`
cluster its pending resources make Ray's autoscaler launch a node of that pool's type). If no node comes for
`stuck_after_s`, the step counts as stuck (the planner may switch a worker's role instead).

Role switch: `switch(role, source)` (the planner's answer when a pool must grow and no node can come): a pending
new worker is cancelled, a worker of the other pool is drained, switched in place (`router.role_worker`: the same
weights, its caches flushed) and moved to the pool that needed it.

Scaling down: `shrink(role)` drains the least busy worker: placement skips it at once; its running requests
finish, or, after `drain_timeout_s`, the actor is stopped and they migrate (the router's path for a dead
worker), so no request is lost. Then it leaves the pool and its actor exits (an idle node can be released).

One step per pool at a time (`busy(role)`). Call order: `Scaler(...)` -> `PlannerLoop(...).start()` ->
`stop()` at serve shutdown (before the pools stop)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engine.messages import Role, WorkerOptions
from router.cluster import Cluster, ClusterSpec, start_worker, worker_slot
from router.metrics import Metrics
from router.planner import Decision, DecodeSignals, Direction, Planner, PrefillSignals
from router.pools import PoolMonitor, WorkerSlot

log = logging.getLogger(__name__)


@dataclass
class _Step:
    role: Role
    direction: Direction
    slot: WorkerSlot
    started: float
    cancelled: threading.Event = field(default_factory=threading.Event)


class Scaler:
    """Adds and drains workers of the P/D pools; see the module docstring."""

    def __init__(
        self,
        ray: Any,
        spec: ClusterSpec,
        options: WorkerOptions,
        cluster: Cluster,
        monitor: PoolMonitor,
        *,
        drain_timeout_s: float,
        stall_timeout_s: float,
        stuck_after_s: float,
    ) -> None:
        self.ray, self.spec, self.options = ray, spec, options
        self.cluster, self.pools, self.monitor = cluster, cluster.pools, monitor
        self.drain_timeout_s, self.stall_timeout_s, self.stuck_after_s = drain_timeout_s, stall_timeout_s, stuck_after_s
        self._steps: dict[Role, _Step] = {}
        self._lock = threading.Lock()
        self._names = itertools.count(len(self.pools.workers))
        self._handles: dict[str, Any] = {}  # slot name -> actor, for workers this scaler started
        self.closed = threading.Event()

    def busy(self, role: Role) -> bool:
        with self._lock:
            return role in self._steps

    def growing(self, role: Role) -> bool:
        with self._lock:
            step = self._steps.get(role)
        return step is not None and step.direction is Direction.UP

    def stuck(self, role: Role) -> bool:
        """A worker of `role` was asked for `stuck_after_s` ago and has not answered (no node for it)."""
        with self._lock:
            step = self._steps.get(role)
        return (
            step is not None and step.direction is Direction.UP and time.monotonic() - step.started > self.stuck_after_s
        )

    def workers(self, role: Role) -> list[WorkerSlot]:
        """The pool's workers that count: not draining."""
        return [w for w in self.pools.pool(role) if not w.draining]

    def grow(self, role: Role) -> WorkerSlot:
        name = f"{role.value}-{next(self._names)}"
        handle, slot = start_worker(self.ray, role, self.spec, self.options, name, self.stall_timeout_s)
        slot.alive = False  # out of rotation until it answers
        self._handles[name] = handle
        self.cluster.handles.append(handle)
        self.pools.add(slot)
        step = _Step(role, Direction.UP, slot, time.monotonic())
        with self._lock:
            self._steps[role] = step
        threading.Thread(target=self._await_ready, args=(step, handle), name=f"grow-{name}", daemon=True).start()
        return slot

    def _await_ready(self, step: _Step, handle: Any) -> None:
        slot = step.slot
        while not self.closed.is_set() and not step.cancelled.is_set():
            ready, _ = self.ray.wait([handle.ping.remote()], timeout=min(5.0, self.stuck_after_s))
            if ready:
                try:
                    self.ray.get(ready[0])
                except Exception as e:  # its constructor failed: Ray restarts it; keep waiting
                    log.warning("%s failed to start (%s); waiting for its restart", slot.name, type(e).__name__)
                    time.sleep(1.0)
                    continue
                self.monitor.watch(slot)  # the monitor describes it and puts it in rotation
                log.info("planner: %s is up", slot.name)
                break
        with self._lock:
            if self._steps.get(slot.role) is step:
                self._steps.pop(slot.role)

    def shrink(self, role: Role) -> WorkerSlot | None:
        """Drain the least busy worker of `role`, the newest of equally busy ones (what scaling up added goes
        first, so its node can be released). None: none may go."""
        workers = self.workers(role)
        if len(workers) <= 1:
            return None
        slot = self._mark_draining(workers)
        with self._lock:
            self._steps[role] = _Step(role, Direction.DOWN, slot, time.monotonic())
        threading.Thread(target=self._drain, args=(slot,), name=f"drain-{slot.name}", daemon=True).start()
        return slot

    def _mark_draining(self, workers: list[WorkerSlot]) -> WorkerSlot:
        """The least busy of `workers` (the newest of equals), out of placement from now on: the router picks and
        claims workers under the pool lock, so no pick lands on it after this."""
        age = {w.name: i for i, w in enumerate(workers)}
        slot = min(workers, key=lambda w: (not w.alive, w.active, w.load.running, w.queued_tokens, -age[w.name]))
        with self.pools.lock:
            slot.draining = True
        return slot

    def _drain(self, slot: WorkerSlot) -> None:
        end = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < end and not self.closed.is_set() and not drained(slot):
            time.sleep(0.1)
        left = slot.active
        log.info(
            "planner: %s drained%s; stopping it",
            slot.name,
            f" ({left} requests migrate after --drain-timeout)" if left else "",
        )
        handle = self._handle(slot)
        with contextlib.suppress(Exception):  # it may be gone already
            self.ray.get(handle.shutdown.remote(), timeout=5 if left == 0 else 0.1)
        with contextlib.suppress(Exception):
            self.ray.kill(handle, no_restart=True)  # running requests (if any) see it die and migrate
        self.monitor.unwatch(slot)
        self.pools.remove(slot)
        with contextlib.suppress(ValueError):
            self.cluster.handles.remove(handle)
        with self._lock:
            self._steps.pop(slot.role, None)

    def switch(self, role: Role, source: Role) -> WorkerSlot | None:
        """A worker of `source` becomes one of `role` in place: a pending new `role` worker (no node came) is
        cancelled; the least busy `source` worker (the newest of equals) is drained, switched (`RoleWorker`) and
        moved to the other pool. If it is still busy after `drain_timeout_s`, the switch is abandoned (nothing is
        interrupted) and the worker goes back into rotation. None: no worker may go."""
        workers = self.workers(source)
        if len(workers) <= 1:
            return None
        with self._lock:
            pending = self._steps.get(role)
        if pending is not None and pending.direction is Direction.UP:
            self._cancel_grow(pending)
        slot = self._mark_draining(workers)
        step = _Step(role, Direction.SWITCH, slot, time.monotonic())
        with self._lock:
            self._steps[role] = self._steps[source] = step
        threading.Thread(target=self._switch, args=(step, source), name=f"switch-{slot.name}", daemon=True).start()
        return slot

    def _switch(self, step: _Step, source: Role) -> None:
        slot, role = step.slot, step.role
        try:
            end = time.monotonic() + self.drain_timeout_s
            while time.monotonic() < end and not self.closed.is_set() and not drained(slot):
                time.sleep(0.1)
            if not drained(slot):
                log.warning("planner: %s still busy after %.0f s; switch abandoned", slot.name, self.drain_timeout_s)
                slot.draining = False
                return
            handle = self._handle(slot)
            with slot.role_lock:  # its watcher stops first, so it never switches the worker back
                self.monitor.unwatch(slot)
                slot.client.switch(role)
            name = f"{role.value}-{next(self._names)}"
            moved = worker_slot(self.ray, role, handle, name, self.stall_timeout_s)
            moved.alive = False  # in rotation once the monitor described it (its new role and KV address)
            self._handles[name] = handle
            self.pools.remove(slot)
            self.pools.add(moved)
            self.monitor.watch(moved)  # described again (a new incarnation: role, KV address), then in rotation
            log.info("planner: %s is now %s (%s)", slot.name, role.value, name)
        except Exception as e:  # the worker died meanwhile: Ray restarts it in its old role, in its old pool
            log.warning("planner: switching %s failed (%s); it stays %s", slot.name, e, source.value)
            slot.draining = False
            if slot in self.pools.pool(source):
                self.monitor.watch(slot)
        finally:
            with self._lock:
                for r in (role, source):
                    if self._steps.get(r) is step:
                        self._steps.pop(r)

    def _cancel_grow(self, step: _Step) -> None:
        """Give up on a new worker that found no node: its actor (pending) goes, and its slot."""
        step.cancelled.set()
        handle = self._handles.pop(step.slot.name, None)
        if handle is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(handle, no_restart=True)
            with contextlib.suppress(ValueError):
                self.cluster.handles.remove(handle)
        self.monitor.unwatch(step.slot)
        self.pools.remove(step.slot)
        with self._lock:
            if self._steps.get(step.role) is step:
                self._steps.pop(step.role)
        log.info("planner: %s cancelled (no node for it)", step.slot.name)

    def _handle(self, slot: WorkerSlot) -> Any:
        return self._handles.get(slot.name) or slot.client.handle

    def close(self) -> None:
        self.closed.set()


def drained(slot: WorkerSlot) -> bool:
    """Nothing runs on it that the router placed, and its own last report agrees."""
    load = slot.load
    return slot.active == 0 and load.queued == 0 and load.running == 0 and load.reserved == 0 and load.transferring == 0


class PlannerLoop:
    """Every `interval_s`: the signals -> `Planner.tick` -> each decision logged, counted and carried out."""

    def __init__(
        self, planner: Planner, scaler: Scaler, metrics: Metrics, slots_per_worker: int, interval_s: float
    ) -> None:
        self.planner, self.scaler, self.metrics = planner, scaler, metrics
        self.slots, self.interval_s = slots_per_worker, interval_s
        self._stop = threading.Event()
        self._last = time.monotonic()
        self.decisions: list[Decision] = []  # every decision so far (status, tests)

    def start(self) -> PlannerLoop:
        threading.Thread(target=self._run, name="planner", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.scaler.close()

    def signals(self) -> tuple[PrefillSignals, DecodeSignals]:
        s, now = self.scaler, time.monotonic()
        prefill = s.workers(Role.PREFILL)
        decode = s.workers(Role.DECODE)
        total = sum(w.load.total_pages for w in decode if w.alive)
        free = sum(w.load.free_pages + w.load.cached_pages for w in decode if w.alive)
        p = PrefillSignals(
            len(prefill),
            sum(w.queued_tokens for w in prefill),
            self.metrics.recent.prefill_rate(),
            busy=s.busy(Role.PREFILL),
            growing=s.growing(Role.PREFILL),
            stuck=s.stuck(Role.PREFILL),
        )
        d = DecodeSignals(
            len(decode),
            sum(max(w.active, w.load.running + w.load.reserved) for w in decode),
            self.slots,
            1.0 - free / total if total else 0.0,
            self.metrics.recent.p90_itl(self._last),
            busy=s.busy(Role.DECODE),
            growing=s.growing(Role.DECODE),
            stuck=s.stuck(Role.DECODE),
        )
        self._last = now
        return p, d

    def tick(self) -> list[Decision]:
        decisions = self.planner.tick(*self.signals())
        for d in decisions:
            log.info("%s", d)
            self.metrics.planner_decisions.labels(d.role.value, d.direction.value, d.reason.value).inc()
            self.decisions.append(d)
            if d.direction is Direction.UP:
                self.scaler.grow(d.role)
            elif d.direction is Direction.DOWN:
                self.scaler.shrink(d.role)
            elif d.source is not None:
                self.scaler.switch(d.role, d.source)
        return decisions

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # the planner must never take serving down
                log.exception("planner tick failed")
