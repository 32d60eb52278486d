"""The router's request path over the worker pools, through the typed worker protocols (`engine.protocols`).

Request lifecycle (`RequestState`, each transition time-stamped; the stamps give the TTFT breakdown):
  1. QUEUED       a validated request enters `generate()`; if the decode pool is full (or has no live worker) it
                  waits in the bounded FIFO admission queue (`router.admission`).
  2. RESERVED     a decode worker set pages aside for it (the one holding the longest cached prefix of the
                  prompt, within a load threshold; else the least loaded) and answered how many leading tokens
                  it already holds; its answer is the first item of the request's stream from that worker.
  3. PREFILLING   the prefill worker holding the longest cached prefix (within a load threshold; else the least
                  loaded) runs what its cache lacks; its first token is yielded at once (TTFT). When what the
                  decode worker lacks is at most `local_prefill_max_tokens`, or no prefill worker is alive
                  (decode-only fallback), the decode worker prefills it itself: no prefill worker, no transfer.
  4. KV_TRANSFER  the prefill worker pushes the KV after what the decode worker holds, with the first token in
                  its header, straight to the decode worker (never through the router); the decode worker starts
                  the sequence on import.
  5. DECODING     the decode worker streams the remaining tokens; the router forwards them.
  6. FINISHED / CANCELLED / FAILED   in `finally` the router tells every worker holding the request to drop it,
                  sets the record's `Outcome`, and records every metric and the trace from it (`router.record`):
                  the fronts (gRPC, HTTP) only convert.

Failures are values the router acts on. Before a token went out, a prefill worker that died or is full is
replaced by the next one. After that, a decode worker that dies, stalls, loses the request or evicts it, and a
KV transfer that failed (the prefill worker already retried it once), *migrate* the request: a new attempt
re-prefills the prompt plus every token already streamed and continues on a live decode worker (another one, or
the same one once Ray restarted it), up to `migration_limit` times; the client's stream goes on without a gap or
a duplicate. Each attempt runs under its own worker-side id (`<id>~<n>`), so a late cancel of an old attempt
never touches the new one. Colocated mode: one colocated worker runs the whole request (the baseline), same API,
same migration.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from engine.messages import Admission, ErrorKind, GenerationRequest, Output, RequestError, Role
from engine.prefix_cache import page_hashes
from engine.protocols import DecodeAPI, WorkerFault, WorkerGone
from llama_relax.generation import TokenEvent
from router.admission import AdmissionQueue, AdmissionRefused, Busy, NoWorker, QueueLimits
from router.metrics import Metrics
from router.pools import Pools, WorkerSlot, decode_order, note_placed, pick_prefill
from router.record import Migration, Outcome, RequestRecord, RequestState, RouterError
from router.tracing import Tracer

log = logging.getLogger(__name__)


class ServeMode(enum.Enum):
    DISAGGREGATED = "disaggregated"
    COLOCATED = "colocated"


# what a decode-side failure reported in a stream means: the request moves to another attempt
MIGRATABLE = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.INTERNAL, ErrorKind.EVICTED, ErrorKind.TRANSFER_FAILED})


class Migrate(Exception):
    """This attempt is lost after tokens may have gone out; the request continues in a new attempt."""


class NoPrefillWorker(Exception):
    """No prefill worker is alive (or every one died before a token): the decode worker prefills instead."""


@dataclass(frozen=True)
class RouterOptions:
    """How the router places, queues and retries (checked once, from the flags, by `router.config.ServeConfig`)."""

    migration_limit: int = 3  # migrations per request
    recovery_timeout_s: float = 60.0  # how long a request waits for a decode worker to come back
    max_queue_wait_s: float = 30.0  # how long a request waits for room on the decode pool
    max_queued: int = 256  # requests waiting for room; past this, RESOURCE_EXHAUSTED at once
    cache_aware: bool = True  # place on the workers holding the longest prefix of the prompt (within balance)
    local_prefill_max_tokens: int = 64  # the decode worker prefills an uncached part this short itself (0: off)
    balance_requests: int = 4  # cache-aware decode placement yields to load beyond this many more active requests
    balance_tokens: int = 1024  # ... and prefill placement beyond this many more queued prompt tokens


@dataclass(frozen=True)
class Done:
    """Last item of `generate`: the record with timings and usage."""

    record: RequestRecord


class Router:
    def __init__(
        self,
        pools: Pools,
        mode: ServeMode,
        options: RouterOptions | None = None,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.pools = pools
        self.mode = mode
        self.options = options or RouterOptions()
        self.metrics = metrics or Metrics()
        self.tracer = tracer or Tracer()  # off unless given an OTLP endpoint
        o = self.options
        self.admission: AdmissionQueue[WorkerSlot] = AdmissionQueue(
            QueueLimits(o.max_queued, o.max_queue_wait_s, o.recovery_timeout_s)
        )
        self._inflight: dict[str, RequestRecord] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._background = cf.ThreadPoolExecutor(4, thread_name_prefix="router-cancel")

    # ---- public -------------------------------------------------------------------------------------------
    def generate(
        self,
        req: GenerationRequest,
        deadline: float | None = None,
        arrival: float | None = None,
        traceparent: str = "",
    ) -> Iterator[TokenEvent | Done]:
        """The request's token events, then `Done`; raises `RouterError` with the outcome when it fails.
        `deadline` (monotonic) bounds every wait (admission, recovery); `arrival` (monotonic, default now) is when
        the front received it; `traceparent` is the client's W3C trace context. Every metric of the request and
        its trace are recorded here, once, whichever front called (the fronts only convert)."""
        rec = RequestRecord(req.request_id, len(req.prompt_ids), traceparent=traceparent)
        if arrival is not None:
            rec.arrival = arrival
        rec.mark(RequestState.QUEUED)
        with self._lock:
            if self._draining:
                raise RouterError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            if req.request_id in self._inflight:
                raise RouterError(ErrorKind.INVALID, f"request_id {req.request_id!r} is already in flight")
            self._inflight[req.request_id] = rec
        span = self.tracer.start(rec)
        req = self.tracer.propagate(req, span)
        finished = False
        try:
            for event in self._migrating(req, rec, deadline):
                self.metrics.observe_token(rec, time.monotonic(), event.drafted, event.accepted)
                if event.finish_reason is not None:  # the worker ended it: nothing to release, even if the client
                    finished = True  # leaves before it reads this last token
                    rec.finish(Outcome.FINISHED, event.finish_reason.value)
                yield event
            rec.mark(RequestState.FINISHED if finished else RequestState.CANCELLED)
            yield Done(rec)
        except RouterError as e:
            rec.mark(RequestState.FAILED)
            rec.finish(_outcome(e.kind, deadline))
            if e.kind is ErrorKind.INTERNAL:
                log.error("request %s failed (error id %s): %s", req.request_id, e.error_id, e.message)
            raise
        except Exception as e:  # a bug on the request path: INTERNAL with an id, the traceback in the log
            rec.mark(RequestState.FAILED)
            rec.finish(Outcome.INTERNAL)
            raise RouterError.bug(req.request_id) from e
        finally:
            if not finished:
                self._release(rec)
            rec.finish(_outcome(ErrorKind.CANCELLED, deadline))  # the client left before the end
            with self._lock:
                self._inflight.pop(req.request_id, None)
            self.admission.notify()
            self.metrics.observe_request(rec)
            self.tracer.end(span, rec)

    def cancel(self, request_id: str) -> None:
        """Tell every worker holding the request to drop it (in the background; safe to repeat)."""
        with self._lock:
            rec = self._inflight.get(request_id)
        if rec is not None:
            self._release(rec)

    def drain(self, timeout_s: float) -> int:
        """Refuse new requests and wait up to `timeout_s` for the in-flight ones; how many are still running."""
        with self._lock:
            self._draining = True
        end = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < end:
            time.sleep(0.1)
        return len(self._inflight)

    def close(self) -> None:
        self._background.shutdown(wait=True)

    # ---- migration ----------------------------------------------------------------------------------------
    def _migrating(self, req: GenerationRequest, rec: RequestRecord, deadline: float | None) -> Iterator[TokenEvent]:
        """Attempts until the request finishes: each one resumes after the tokens the client already has."""
        produced: list[int] = []
        while True:
            rid = req.request_id if rec.migrations == 0 else f"{req.request_id}~{rec.migrations}"
            attempt = dataclasses.replace(req, request_id=rid, resume_ids=tuple(produced))
            rec.attempt_id = attempt.request_id
            rec.page_hashes = tuple(page_hashes(attempt.token_ids)) if self.options.cache_aware else ()
            flow = self._colocated if self.mode is ServeMode.COLOCATED else self._disaggregated
            try:
                for event in flow(attempt, rec, deadline):
                    produced.append(event.token_id)
                    yield event
                return
            except Migrate as e:
                self._release(rec)
                rec.migration_log.append(Migration(time.monotonic(), str(e), len(produced)))
                if rec.migrations >= self.options.migration_limit:
                    raise RouterError(
                        ErrorKind.UNAVAILABLE, f"gave up after {rec.migrations} migrations; last failure: {e}"
                    ) from e
                rec.migrations += 1
                self.metrics.migrations.inc()
                log.warning("request %s migrates after %d tokens (%s)", req.request_id, len(produced), e)

    def _release(self, rec: RequestRecord) -> None:
        """Every worker of the current attempt drops it (fire and forget)."""
        rid, workers = rec.attempt_id, list(rec.workers.values())
        rec.workers = {}
        for w in workers:
            self._background.submit(_quiet_cancel, w, rid)

    # ---- flows --------------------------------------------------------------------------------------------
    def _disaggregated(self, req: GenerationRequest, rec: RequestRecord, deadline: float | None):
        d, events = self._place(self.pools.decode, req, rec, deadline)
        try:
            if len(req.token_ids) - rec.decode_cached <= self.options.local_prefill_max_tokens:
                self.metrics.local_prefills.inc()  # little left to compute: no prefill worker, no transfer
                yield from self._prefill_on(d, events, req, rec)
                return
            try:
                first = yield from self._prefill(req, rec, d)
            except NoPrefillWorker:
                self.metrics.fallbacks.inc()
                yield from self._prefill_on(d, events, req, rec)
                return
            if first.finish_reason is not None:  # ended with its first token: free the decode side's reservation
                self._release(rec)
                return
            rec.mark(RequestState.DECODING)
            with self._on_decode(d):
                yield from self._events(events, rec)
        finally:
            events.close()
            with self.pools.lock:
                d.active -= 1

    def _colocated(self, req: GenerationRequest, rec: RequestRecord, deadline: float | None):
        """A colocated worker is a decode engine that prefills everything itself: reserve, then prefill there."""
        w, events = self._place(self.pools.colocated, req, rec, deadline)
        try:
            yield from self._prefill_on(w, events, req, rec)
        finally:
            events.close()
            with self.pools.lock:
                w.active -= 1

    def _prefill_on(
        self, w: WorkerSlot[DecodeAPI], events: Iterator[Output], req: GenerationRequest, rec: RequestRecord
    ):
        """The reserved decode-side worker prefills the prompt (after what it holds) and decodes it: its
        reservation's stream carries every event."""
        rec.mark(RequestState.PREFILLING)
        rec.cached_tokens = rec.decode_cached
        with self._on_decode(w):
            started = w.client.prefill_local(req.request_id)
            if not started.ok:  # the reservation ended meanwhile (its lease, a restart): its stream says why
                log.warning("request %s: %s", req.request_id, started.reason)
            yield from self._events(events, rec)

    def _place(
        self, slots: list[WorkerSlot[DecodeAPI]], req: GenerationRequest, rec: RequestRecord, deadline: float | None
    ) -> tuple[WorkerSlot[DecodeAPI], Iterator[Output]]:
        """The decode (or colocated) worker for this attempt and its reservation's stream, through the admission
        queue: it waits, in order, while every worker is full or none is alive, within the queue's bounds and the
        client's deadline."""
        try:
            placed, waited = self.admission.admit(lambda: self._try_place(slots, req, rec), deadline)
        except AdmissionRefused as e:
            raise RouterError(e.kind, e.message) from e
        rec.queue_wait_s += waited
        return placed

    def _try_place(
        self, slots: list[WorkerSlot[DecodeAPI]], req: GenerationRequest, rec: RequestRecord
    ) -> tuple[WorkerSlot[DecodeAPI], Iterator[Output]] | Busy | NoWorker:
        """One pass over the workers, best first: reserve on the first that has room. A candidate's `active`
        count is raised before asking it (under the pool lock), so concurrent requests spread out instead of all
        picking the same one."""
        reasons: list[str] = []
        tried: set[str] = set()
        role = Role.COLOCATED if self.mode is ServeMode.COLOCATED else Role.DECODE
        while True:
            with self.pools.lock:
                ranked = decode_order(slots, rec.page_hashes, self.options.balance_requests)
                order = [w for w in ranked if w.name not in tried]
                if not order:
                    break
                w = order[0]
                w.active += 1
            tried.add(w.name)
            events: Iterator[Admission | Output] | None = None
            try:
                events = w.client.reserve(req)
                admission = next(events)  # the stream's first item is the answer
                self.pools.record(w, ok=True)
            except (WorkerGone, WorkerFault, StopIteration) as e:
                self.pools.record(w, ok=False)
                if isinstance(e, WorkerGone):
                    self.pools.mark_dead(w)
                admission = None
                reasons.append(f"{w.name}: {e or 'no answer'}")
            if admission is not None and admission.ok:
                rec.workers[role] = w
                rec.decode_cached = admission.cached_tokens
                note_placed(w, rec.page_hashes)
                rec.mark(RequestState.RESERVED)
                return w, events
            if events is not None:
                events.close()
            with self.pools.lock:
                w.active -= 1
            if admission is not None:
                if admission.kind is ErrorKind.INVALID:  # the workers are alike: no other one takes it either
                    raise RouterError(ErrorKind.INVALID, admission.reason)
                reasons.append(f"{w.name}: {admission.reason}")
        if not any(w.available for w in slots):
            return NoWorker(f"no live {role.value} worker")
        return Busy(f"all {role.value} workers are busy (" + "; ".join(reasons) + ")")

    def _prefill(self, req: GenerationRequest, rec: RequestRecord, d: WorkerSlot[DecodeAPI]):
        """Run the prompt on a prefill worker, which pushes the KV to `d`; yields the first token and returns it.

        Before a token went out, a prefill worker that died or was full is replaced by the next one; with none
        left alive this raises `NoPrefillWorker`. After the token, a lost prefill worker or a failed transfer
        migrates the request."""
        tried: set[str] = set()
        reasons: list[str] = []
        while True:
            with self.pools.lock:  # picked and claimed at once: a worker the planner drains is never picked
                candidates = [w for w in self.pools.prefill if w.name not in tried]  # after its drain began
                p = pick_prefill(candidates, rec.page_hashes, self.options.balance_tokens)
                if p is not None:
                    p.active += 1
                    p.queued_tokens += len(req.token_ids)
            if p is None:
                if reasons and any(w.available for w in self.pools.prefill):
                    raise RouterError(ErrorKind.BUSY, "all prefill workers are busy (" + "; ".join(reasons) + ")")
                raise NoPrefillWorker()
            tried.add(p.name)
            rec.workers[Role.PREFILL] = p
            rec.mark(RequestState.PREFILLING)
            first: TokenEvent | None = None
            try:
                for item in p.client.prefill_stream(req, d.kv_address, rec.decode_cached):
                    if isinstance(item, TokenEvent):
                        first = item
                        rec.mark(RequestState.KV_TRANSFER)
                        yield item
                        continue
                    rec.prefill, rec.prefill_done_at = item, time.monotonic()
                    self.metrics.kv_retries.inc(item.transfer_retries)
                    self.pools.record(p, ok=True)
                    if item.error is None:
                        if first is None:
                            raise RouterError(ErrorKind.INTERNAL, f"{p.name} reported no first token")
                        rec.cached_tokens = item.cached_tokens
                        note_placed(p, rec.page_hashes)
                        return first
                    kind = item.error.kind
                    if first is None and kind in (ErrorKind.BUSY, ErrorKind.UNAVAILABLE):
                        reasons.append(f"{p.name}: {item.error.message}")
                        break  # full, or shutting down: try the next prefill worker
                    if kind is ErrorKind.TRANSFER_FAILED or (first is not None and kind is ErrorKind.UNAVAILABLE):
                        raise Migrate(item.error.message)  # recompute (a transfer was already retried once)
                    raise RouterError(item.error.kind, item.error.message)
                else:
                    raise RouterError(ErrorKind.INTERNAL, f"{p.name}: prefill stream ended without a result")
            except WorkerGone as e:
                self.pools.mark_dead(p)
                self.pools.record(p, ok=False)
                if first is not None:  # token 1 reached the client: recompute in a new attempt
                    raise Migrate(f"prefill worker {p.name} died") from e
                reasons.append(f"{p.name}: died")
                rec.workers.pop(Role.PREFILL, None)
            except WorkerFault as e:
                self.pools.record(p, ok=False)
                raise RouterError(ErrorKind.INTERNAL, f"worker {p.name} failed: {e.message}") from e
            finally:
                with self.pools.lock:
                    p.active -= 1
                    p.queued_tokens = max(0, p.queued_tokens - len(req.token_ids))

    @staticmethod
    def _events(items: Iterator[Output], rec: RequestRecord) -> Iterator[TokenEvent]:
        """Forward a worker's token stream until its terminal item. A lost or evicted request migrates; any
        other RequestError ends the request with its kind."""
        for item in items:
            if isinstance(item, RequestError):
                if item.kind in MIGRATABLE:
                    raise Migrate(f"{item.kind.value}: {item.message}")
                raise RouterError(item.kind, item.message)
            if rec.state is not RequestState.DECODING:
                rec.mark(RequestState.DECODING)
            yield item
            if item.finish_reason is not None:
                return

    @contextlib.contextmanager
    def _on_decode(self, w: WorkerSlot) -> Iterator[None]:
        """A decode-side worker that is gone migrates the request; a fault inside it is INTERNAL."""
        try:
            yield
            self.pools.record(w, ok=True)
        except WorkerGone as e:
            self.pools.mark_dead(w)
            self.pools.record(w, ok=False)
            raise Migrate(f"worker {w.name} died") from e
        except WorkerFault as e:
            self.pools.record(w, ok=False)
            raise RouterError(ErrorKind.INTERNAL, f"worker {w.name} failed: {e.message}") from e


def _outcome(kind: ErrorKind, deadline: float | None) -> Outcome:
    """A request that was cancelled, refused or left waiting once the client's deadline had passed ended by the
    deadline; any other failure keeps its kind."""
    past = deadline is not None and time.monotonic() >= deadline
    if past and kind in (ErrorKind.CANCELLED, ErrorKind.UNAVAILABLE, ErrorKind.BUSY):
        return Outcome.DEADLINE_EXCEEDED
    return Outcome.of(kind)


def _quiet_cancel(w: WorkerSlot, request_id: str) -> None:
    with contextlib.suppress(Exception):  # a dead worker holds nothing any more
        w.client.cancel(request_id)
