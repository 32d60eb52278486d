"""The router's request path over the worker pools (Ray actors).

Request lifecycle (`RequestState`, each transition time-stamped; the stamps give the TTFT breakdown):
  1. QUEUED       validated request enters `generate()`.
  2. RESERVED     a decode worker reserved pages for it (best decode worker first; all refuse -> BUSY).
  3. PREFILLING   the least-loaded prefill worker runs the prompt; its first token is yielded at once (TTFT).
  4. KV_TRANSFER  the prefill worker pushes the KV straight to the decode worker (never through the router).
  5. DECODING     the decode worker streams the remaining tokens; the router forwards them.
  6. FINISHED / CANCELLED / FAILED   in `finally` the router tells both workers to drop anything left.
A prefill worker that dies before a token was sent is retried on another; after that the request ends UNAVAILABLE.
Colocated mode: one colocated worker runs the whole request (the baseline), same API.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llama_relax.generation import TokenEvent
from prefill_worker.messages import ErrorKind, GenerationRequest, PrefillResult, RequestError
from router.pools import Pools, WorkerState, decode_order, pick_prefill


class RequestState(enum.Enum):
    QUEUED = "queued"
    RESERVED = "reserved"
    PREFILLING = "prefilling"
    KV_TRANSFER = "kv_transfer"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class RouterError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class NoWorker(RouterError):
    """A pool has no live worker (UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.TRANSFER_FAILED, message)


@dataclass
class RequestRecord:
    """Time-stamped states and outcome of one request (monotonic seconds)."""

    request_id: str
    prompt_tokens: int
    stamps: dict[RequestState, float] = field(default_factory=dict)
    completion_tokens: int = 0
    prefill: PrefillResult | None = None
    workers: dict[str, WorkerState] = field(default_factory=dict)

    def mark(self, state: RequestState) -> None:
        self.stamps[state] = time.monotonic()

    @property
    def state(self) -> RequestState:
        return max(self.stamps, key=self.stamps.get) if self.stamps else RequestState.QUEUED


@dataclass(frozen=True)
class Done:
    """Last item of `generate`: the record with timings and usage."""

    record: RequestRecord


class Router:
    def __init__(self, ray: Any, pools: Pools, mode: str) -> None:
        self.ray = ray
        self.pools = pools
        self.mode = mode
        self._inflight: dict[str, RequestRecord] = {}
        self._lock = threading.Lock()

    # ---- public -------------------------------------------------------------------------------------------
    def generate(self, req: GenerationRequest) -> Iterator[TokenEvent | Done]:
        rec = RequestRecord(req.request_id, len(req.prompt_ids))
        rec.mark(RequestState.QUEUED)
        with self._lock:
            if req.request_id in self._inflight:
                raise RouterError(ErrorKind.INVALID, f"request_id {req.request_id!r} is already in flight")
            self._inflight[req.request_id] = rec
        finished = False
        try:
            flow = self._colocated(req, rec) if self.mode == "colocated" else self._disaggregated(req, rec)
            for event in flow:
                rec.completion_tokens += 1
                yield event
                if event.finish_reason is not None:
                    finished = True
            rec.mark(RequestState.FINISHED if finished else RequestState.CANCELLED)
            yield Done(rec)
        except RouterError:
            rec.mark(RequestState.FAILED)
            raise
        finally:
            if not finished:
                self.cancel(req.request_id)
            with self._lock:
                self._inflight.pop(req.request_id, None)

    def cancel(self, request_id: str) -> None:
        """Tell every worker holding the request to drop it (fire and forget; safe to repeat)."""
        with self._lock:
            rec = self._inflight.get(request_id)
        if rec is None:
            return
        for w in rec.workers.values():
            with contextlib.suppress(Exception):  # a dead worker holds nothing any more
                w.handle.cancel.remote(request_id)

    # ---- flows --------------------------------------------------------------------------------------------
    def _call(self, w: WorkerState, method: str, *args: Any) -> Any:
        try:
            return self.ray.get(getattr(w.handle, method).remote(*args))
        except self.ray.exceptions.RayActorError as e:
            self.pools.mark_dead(w)
            raise WorkerDied(w) from e

    def _stream(self, w: WorkerState, method: str, *args: Any) -> Iterator[Any]:
        try:
            for ref in getattr(w.handle, method).remote(*args):
                yield self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:
            self.pools.mark_dead(w)
            raise WorkerDied(w) from e

    def _events(self, w: WorkerState, method: str, *args: Any, on_first=None) -> Iterator[TokenEvent]:
        """Forward a worker's token stream until its terminal item; a RequestError becomes a RouterError."""
        for i, item in enumerate(self._stream(w, method, *args)):
            if isinstance(item, RequestError):
                raise RouterError(item.kind, item.message)
            if i == 0 and on_first is not None:
                on_first()
            yield item
            if item.finish_reason is not None:
                return

    def _reserve_decode(self, req: GenerationRequest, rec: RequestRecord, role: str) -> WorkerState:
        """Try decode workers best first. A candidate's `active` count is raised before asking it (under the
        pool lock), so concurrent requests spread out instead of all picking the same "best" worker."""
        reasons: list[str] = []
        tried: set[str] = set()
        while True:
            with self.pools.lock:
                order = [w for w in decode_order(self.pools.role(role)) if w.name not in tried]
                if not order:
                    break
                w = order[0]
                w.active += 1
            tried.add(w.name)
            try:
                admission = self._call(w, "reserve", req)
            except WorkerDied:
                admission = None
            if admission is not None and admission.ok:
                rec.workers["decode"] = w
                return w
            with self.pools.lock:
                w.active -= 1
            if admission is not None:
                reasons.append(f"{w.name}: {admission.reason}")
        if not reasons:
            raise NoWorker(f"no live {role} worker")
        raise RouterError(ErrorKind.BUSY, "all decode workers are busy (" + "; ".join(reasons) + ")")

    def _disaggregated(self, req: GenerationRequest, rec: RequestRecord) -> Iterator[TokenEvent]:
        d = self._reserve_decode(req, rec, "decode")
        rec.mark(RequestState.RESERVED)
        try:
            kv_address = self._call(d, "kv_address")
            first, result = yield from self._prefill(req, rec, kv_address)
            if first is None or not result.ok:
                err = result.error if result.error else RequestError(req.request_id, ErrorKind.INTERNAL, "no token")
                raise RouterError(err.kind, err.message)
            self._call(d, "start_decoding", req.request_id, first)
            if first.finish_reason is not None:
                return
            rec.mark(RequestState.DECODING)
            yield from self._events(d, "stream", req.request_id)
        except WorkerDied as e:
            raise RouterError(ErrorKind.TRANSFER_FAILED, f"worker {e.worker.name} died") from e
        finally:
            with self.pools.lock:
                d.active -= 1

    def _prefill(self, req: GenerationRequest, rec: RequestRecord, kv_address: str):
        """Run the prompt on a prefill worker; yields the first token event; returns (first, result)."""
        tried: set[str] = set()
        while True:
            p = pick_prefill([w for w in self.pools.role("prefill") if w.name not in tried])
            if p is None:
                raise NoWorker("no live prefill worker" + (" (all tried)" if tried else ""))
            tried.add(p.name)
            rec.workers["prefill"] = p
            rec.mark(RequestState.PREFILLING)
            with self.pools.lock:
                p.queued_tokens += len(req.prompt_ids)
            first: TokenEvent | None = None
            try:
                for item in self._stream(p, "prefill_stream", req, kv_address):
                    if isinstance(item, TokenEvent):
                        first = item
                        rec.mark(RequestState.KV_TRANSFER)
                        yield item
                    else:
                        rec.prefill = item
                        return first, item
                raise RouterError(ErrorKind.INTERNAL, "prefill stream ended without a result")
            except WorkerDied:
                if first is not None:  # a token already went out: no silent retry
                    raise
            finally:
                with self.pools.lock:
                    p.queued_tokens = max(0, p.queued_tokens - len(req.prompt_ids))

    def _colocated(self, req: GenerationRequest, rec: RequestRecord) -> Iterator[TokenEvent]:
        w = self._reserve_colocated(rec)
        rec.mark(RequestState.PREFILLING)
        try:
            yield from self._events(w, "generate", req, on_first=lambda: rec.mark(RequestState.DECODING))
        except WorkerDied as e:
            raise RouterError(ErrorKind.TRANSFER_FAILED, f"worker {e.worker.name} died") from e
        finally:
            with self.pools.lock:
                w.active -= 1

    def _reserve_colocated(self, rec: RequestRecord) -> WorkerState:
        order = decode_order(self.pools.role("colocated"))
        if not order:
            raise NoWorker("no live colocated worker")
        w = order[0]
        rec.workers["colocated"] = w
        with self.pools.lock:
            w.active += 1
        return w


class WorkerDied(Exception):
    def __init__(self, worker: WorkerState) -> None:
        super().__init__(worker.name)
        self.worker = worker
