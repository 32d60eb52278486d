"""The router's request path over the worker pools, through the typed worker protocols (`engine.protocols`).

Request lifecycle (`RequestState`, each transition time-stamped; the stamps give the TTFT breakdown):
  1. QUEUED       a validated request enters `generate()`.
  2. RESERVED     a decode worker set pages aside for it (best decode worker first; all full -> BUSY).
  3. PREFILLING   the least-loaded prefill worker runs the prompt; its first token is yielded at once (TTFT).
  4. KV_TRANSFER  the prefill worker pushes the KV, with the first token in its header, straight to the decode
                  worker (never through the router); the decode worker starts the sequence on import.
  5. DECODING     the decode worker streams the remaining tokens; the router forwards them.
  6. FINISHED / CANCELLED / FAILED   in `finally` the router tells every worker holding the request to drop it.
A prefill worker that dies or is full before a token was sent is retried on another; after a token went out a
failure ends the request. Colocated mode: one colocated worker runs the whole request (the baseline), same API.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import enum
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.loop import Output
from engine.messages import ErrorKind, GenerationRequest, PrefillResult, RequestError, Role
from engine.protocols import DecodeAPI, WorkerFault, WorkerGone
from llama_relax.generation import TokenEvent
from router.pools import C, Pools, WorkerSlot, decode_order, pick_prefill


class ServeMode(enum.Enum):
    DISAGGREGATED = "disaggregated"
    COLOCATED = "colocated"


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
    """A request's explicit outcome when it did not finish; `kind` picks the gRPC status."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class RequestRecord:
    """The state and time-stamped transitions of one request (monotonic seconds)."""

    request_id: str
    prompt_tokens: int
    state: RequestState = RequestState.QUEUED
    stamps: dict[RequestState, float] = field(default_factory=dict)
    completion_tokens: int = 0
    prefill: PrefillResult | None = None
    workers: dict[Role, WorkerSlot] = field(default_factory=dict)  # who holds (or held) the request

    def mark(self, state: RequestState) -> None:
        self.state = state
        self.stamps[state] = time.monotonic()


@dataclass(frozen=True)
class Done:
    """Last item of `generate`: the record with timings and usage."""

    record: RequestRecord


class Router:
    def __init__(self, pools: Pools, mode: ServeMode) -> None:
        self.pools = pools
        self.mode = mode
        self._inflight: dict[str, RequestRecord] = {}
        self._lock = threading.Lock()
        self._background = cf.ThreadPoolExecutor(4, thread_name_prefix="router-cancel")

    # ---- public -------------------------------------------------------------------------------------------
    def generate(self, req: GenerationRequest) -> Iterator[TokenEvent | Done]:
        """The request's token events, then `Done`; raises `RouterError` with the outcome when it fails."""
        rec = RequestRecord(req.request_id, len(req.prompt_ids))
        rec.mark(RequestState.QUEUED)
        with self._lock:
            if req.request_id in self._inflight:
                raise RouterError(ErrorKind.INVALID, f"request_id {req.request_id!r} is already in flight")
            self._inflight[req.request_id] = rec
        finished = False
        try:
            flow = self._colocated(req, rec) if self.mode is ServeMode.COLOCATED else self._disaggregated(req, rec)
            for event in flow:
                rec.completion_tokens += 1
                yield event
                finished = event.finish_reason is not None
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
        """Tell every worker holding the request to drop it (in the background; safe to repeat)."""
        with self._lock:
            rec = self._inflight.get(request_id)
        if rec is None:
            return
        for w in rec.workers.values():
            self._background.submit(_quiet_cancel, w, request_id)

    def close(self) -> None:
        self._background.shutdown(wait=True)

    # ---- flows --------------------------------------------------------------------------------------------
    def _disaggregated(self, req: GenerationRequest, rec: RequestRecord) -> Iterator[TokenEvent]:
        d = self._reserve(self.pools.decode, req, rec)
        try:
            first = yield from self._prefill(req, rec, d)
            if first.finish_reason is not None:  # ended with its first token: free the decode side's reservation
                self._background.submit(_quiet_cancel, d, req.request_id)
                return
            rec.mark(RequestState.DECODING)
            with self._calling(d):
                yield from self._events(d.client.stream(req.request_id))
        finally:
            with self.pools.lock:
                d.active -= 1

    def _reserve(self, slots: list[WorkerSlot[DecodeAPI]], req: GenerationRequest, rec: RequestRecord):
        """Reserve on the best decode worker that has room. A candidate's `active` count is raised before asking
        it (under the pool lock), so concurrent requests spread out instead of all picking the same one."""
        reasons: list[str] = []
        tried: set[str] = set()
        while True:
            with self.pools.lock:
                order = [w for w in decode_order(slots) if w.name not in tried]
                if not order:
                    break
                w = order[0]
                w.active += 1
            tried.add(w.name)
            try:
                admission = w.client.reserve(req)
            except (WorkerGone, WorkerFault) as e:
                if isinstance(e, WorkerGone):
                    self.pools.mark_dead(w)
                admission = None
                reasons.append(f"{w.name}: {e}")
            if admission is not None and admission.ok:
                rec.workers[Role.DECODE] = w
                rec.mark(RequestState.RESERVED)
                return w
            with self.pools.lock:
                w.active -= 1
            if admission is not None:
                if admission.kind is ErrorKind.INVALID:  # the workers are alike: no other one takes it either
                    raise RouterError(ErrorKind.INVALID, admission.reason)
                reasons.append(f"{w.name}: {admission.reason}")
        if not any(w.alive for w in slots):
            raise RouterError(ErrorKind.UNAVAILABLE, "no live decode worker")
        raise RouterError(ErrorKind.BUSY, "all decode workers are busy (" + "; ".join(reasons) + ")")

    def _prefill(self, req: GenerationRequest, rec: RequestRecord, d: WorkerSlot[DecodeAPI]):
        """Run the prompt on a prefill worker, which pushes the KV to `d`; yields the first token and returns it.

        Before a token went out, a prefill worker that died or was full is replaced by the next one."""
        tried: set[str] = set()
        reasons: list[str] = []
        while True:
            p = pick_prefill([w for w in self.pools.prefill if w.name not in tried])
            if p is None:
                if reasons and any(w.alive for w in self.pools.prefill):
                    raise RouterError(ErrorKind.BUSY, "all prefill workers are busy (" + "; ".join(reasons) + ")")
                raise RouterError(ErrorKind.UNAVAILABLE, "no live prefill worker" + (" (all tried)" if tried else ""))
            tried.add(p.name)
            rec.workers[Role.PREFILL] = p
            rec.mark(RequestState.PREFILLING)
            first: TokenEvent | None = None
            with self.pools.lock:
                p.queued_tokens += len(req.prompt_ids)
            try:
                for item in p.client.prefill_stream(req, d.kv_address):
                    if isinstance(item, TokenEvent):
                        first = item
                        rec.mark(RequestState.KV_TRANSFER)
                        yield item
                        continue
                    rec.prefill = item
                    if item.error is not None:
                        if first is None and item.error.kind is ErrorKind.BUSY:
                            reasons.append(f"{p.name}: {item.error.message}")
                            break  # try the next prefill worker
                        raise RouterError(item.error.kind, item.error.message)
                    if first is None:
                        raise RouterError(ErrorKind.INTERNAL, f"{p.name} reported no first token")
                    return first
                else:
                    raise RouterError(ErrorKind.INTERNAL, f"{p.name}: prefill stream ended without a result")
            except WorkerGone as e:
                self.pools.mark_dead(p)
                if first is not None:  # a token already went out: no silent retry
                    raise RouterError(ErrorKind.UNAVAILABLE, f"worker {p.name} died") from e
                reasons.append(f"{p.name}: died")
            except WorkerFault as e:
                raise RouterError(ErrorKind.INTERNAL, f"worker {p.name} failed: {e.message}") from e
            finally:
                with self.pools.lock:
                    p.queued_tokens = max(0, p.queued_tokens - len(req.prompt_ids))

    def _colocated(self, req: GenerationRequest, rec: RequestRecord) -> Iterator[TokenEvent]:
        with self.pools.lock:
            order = decode_order(self.pools.colocated)
            if not order:
                raise RouterError(ErrorKind.UNAVAILABLE, "no live colocated worker")
            w = order[0]
            w.active += 1
        rec.workers[Role.COLOCATED] = w
        rec.mark(RequestState.PREFILLING)
        try:
            with self._calling(w):
                for i, event in enumerate(self._events(w.client.generate(req))):
                    if i == 0:
                        rec.mark(RequestState.DECODING)
                    yield event
        finally:
            with self.pools.lock:
                w.active -= 1

    @staticmethod
    def _events(items: Iterator[Output]) -> Iterator[TokenEvent]:
        """Forward a worker's token stream until its terminal item; a RequestError becomes a RouterError."""
        for item in items:
            if isinstance(item, RequestError):
                raise RouterError(item.kind, item.message)
            yield item
            if item.finish_reason is not None:
                return

    @contextlib.contextmanager
    def _calling(self, w: WorkerSlot[C]) -> Iterator[None]:
        """Turn a worker's failure into the request's outcome: gone -> UNAVAILABLE, fault -> INTERNAL."""
        try:
            yield
        except WorkerGone as e:
            self.pools.mark_dead(w)
            raise RouterError(ErrorKind.UNAVAILABLE, f"worker {w.name} died") from e
        except WorkerFault as e:
            raise RouterError(ErrorKind.INTERNAL, f"worker {w.name} failed: {e.message}") from e


def _quiet_cancel(w: WorkerSlot, request_id: str) -> None:
    with contextlib.suppress(Exception):  # a dead worker holds nothing any more
        w.client.cancel(request_id)
