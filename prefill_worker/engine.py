"""The prefill engine: batched (and chunked) prefill, the first token sampled here, then the KV shipped with that
token in its header.

Request lifecycle (`PrefillState`):
  1. QUEUED        `submit(req, kv_target, on_event)`: admitted if the queue has room and the prompt's pages can be
                   reserved, else refused at once (BUSY; INVALID for a duplicate id or a prompt that never fits).
     Its sequence is forked from the longest cached prefix of the prompt (`engine.prefix_cache`): only the
     rest is computed.
  2. PREFILLING    each step packs waiting prompts into one forward of at most `token_budget` tokens (one sequence:
                   `prefill_to_last_hidden_states`, several: `batch_forward_to_last_hidden_states`); longer prompts
                   continue over several steps. A failed forward fails only its own requests.
                   KV streaming (host KV, gRPC): after each step, the tokens a prompt gained go to its decode worker
                   as a partial piece (`KVStream`), sent by a transfer thread while the next chunk computes. The
                   last `stream_tail` tokens of a longer prompt get a forward of their own, so the KV still to move
                   once token 1 is out is that small piece only.
  3. TRANSFERRING  the last chunk's logits give token 1; `on_event(event)` reports it at once (TTFT); the final
                   piece (the rest of the KV, with token 1 in its header) follows the others. Only token positions
                   are read on the engine thread; gathering, checksums and sends run on the transfer thread.
                   A transport failure (reset, checksum, truncated stream) of a piece is retried once; a send not
                   acked within `kv_lease_s` gives up (the lease expired); either way the request fails
                   (TRANSFER_FAILED: the router recomputes it) and the decode side frees what it got.
  4. DONE / FAILED / CANCELLED   the receiver's ack (or a failure / timeout / cancel) ends it: `on_event` gets the
                   `PrefillResult` exactly once, then on the engine thread the prefilled sequence becomes a
                   prefix-cache entry (one whose forward failed is freed with its pages).
A request with `resume_ids` (a migration) prefills prompt + resume_ids and samples the token after them.
Memory: the engine owns the runtime and the page pool; a payload is owned by its transfer thread until the send
returns; a request's sequence is freed only once its stream is idle (a transfer thread may be reading its pages).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core import EngineCore
from engine.faults import FaultInjector, Stage
from engine.kvmeta import PARTIAL, encode_first_token
from engine.messages import (
    Admission,
    ErrorKind,
    GenerationRequest,
    PrefillResult,
    RequestError,
    WorkerLoad,
    WorkerOptions,
)
from engine.prefill_batch import FirstToken, PrefillBatch
from engine.prefix_cache import MISS, Hit
from kvtransfer.payload import ErrorCode, KVPayload
from kvtransfer.route import KVRoute, Scatter
from kvtransfer.runtime_io import export_later, manifest_for, scatter_later, scatters_to, streams_to
from kvtransfer.transport import KVSender, TransferResult
from llama_relax.generation import TokenEvent, TokenizerLike
from llama_relax.runtime import ModelRuntime
from prefill_worker.kvstream import KVStream, Piece, StreamEnd


class PrefillState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a transferring job stays listed in this state until its send returns


PrefillEvent = TokenEvent | PrefillResult
log = logging.getLogger(__name__)
_TERMINAL = frozenset({PrefillState.DONE, PrefillState.FAILED, PrefillState.CANCELLED})


@dataclass
class _Job:
    req: GenerationRequest
    kv_target: str
    route: KVRoute  # kv_target read: the decode worker's receiver, and its stages' when it has them
    on_event: Callable[[PrefillEvent], None]
    seq_id: int
    hit: Hit = MISS  # the cached prefix its sequence was forked from: only the rest is computed
    kv_begin: int = 0  # the decode worker holds the tokens before this: only [kv_begin, n) is sent
    prefilled: bool = False  # its sequence holds the whole prompt (kept in the prefix cache when released)
    released: bool = False
    state: PrefillState = PrefillState.QUEUED
    prefill_end: float = 0.0  # perf_counter when its first token was sampled (the KV hand-off starts)
    export_s: float = 0.0  # engine-thread time of the hand-off (token positions, or a device export)
    sent: int = 0  # KV of tokens [kv_begin, sent) is queued or sent to the decode worker
    streams: bool = False  # partial pieces are sent while the prompt prefills
    stream: KVStream = field(init=False)  # made right after the job (its callbacks name the job)
    first: FirstToken | None = None
    _reported: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, result: PrefillResult) -> None:
        """Deliver the result exactly once, from whichever thread gets there first."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self.on_event(result)

    def emit_first(self, event: TokenEvent) -> bool:
        """Deliver token 1 unless the result (a failure) went out first: never a token after the terminal item."""
        with self._lock:
            if not self._reported:
                self.on_event(event)
            return not self._reported


class PrefillEngine(EngineCore):
    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        sender: KVSender,
        options: WorkerOptions,
        *,
        faults: FaultInjector | None = None,
        transfer_threads: int = 2,
    ) -> None:
        super().__init__("prefill", runtime, tokenizer, options, faults)
        self.sender = sender
        self.batch = PrefillBatch(runtime, options.max_batch_size)
        self.jobs: dict[str, _Job] = {}
        self._transfers = cf.ThreadPoolExecutor(transfer_threads, thread_name_prefix="kv-send")
        self._parts = cf.ThreadPoolExecutor(4, thread_name_prefix="kv-part")  # a piece's parts, sent at once

    # ---- control (any thread) -----------------------------------------------------------------------------
    def submit(
        self, req: GenerationRequest, kv_target: str, on_event: Callable[[PrefillEvent], None], kv_begin: int = 0
    ) -> Admission:
        """Queue `req`; `on_event` gets its first `TokenEvent` (unless the forward fails), then one `PrefillResult`.
        The decode worker already holds the first `kv_begin` tokens (its prefix cache): only the rest is sent."""
        return self.call(lambda: self._submit(req, kv_target, on_event, kv_begin))

    def cancel(self, request_id: str) -> bool:
        return self.call(lambda: self._cancel(request_id))

    def load(self, incarnation: str = "") -> WorkerLoad:
        def read() -> WorkerLoad:
            transferring = sum(
                j.state is not PrefillState.QUEUED and j.state is not PrefillState.PREFILLING
                for j in self.jobs.values()
            )
            return self.core_load(
                incarnation,
                queued=len(self.batch.queue),
                queued_tokens=self.batch.queued_tokens,
                transferring=transferring,
            )

        return self.call(read)

    def close(self) -> None:
        self.stop()
        self._transfers.shutdown(wait=True)
        self._parts.shutdown(wait=True)
        for job in list(self.jobs.values()):
            self._fail(job, ErrorKind.UNAVAILABLE, "prefill worker shutting down")

    # ---- engine thread ------------------------------------------------------------------------------------
    def _submit(
        self, req: GenerationRequest, kv_target: str, on_event: Callable[[PrefillEvent], None], kv_begin: int
    ) -> Admission:
        rid, n, o = req.request_id, len(req.token_ids), self.options
        if not 0 <= kv_begin < n:
            return Admission.refuse(ErrorKind.INVALID, f"kv_begin must be in [0, {n}) for a {n}-token prompt")
        try:
            route = KVRoute.parse(kv_target)
        except ValueError as e:
            return Admission.refuse(ErrorKind.INVALID, str(e))
        a = self.admit_request(
            req, self.jobs, tokens=n, active=len(self.batch.queue), max_active=o.max_queue, what="prefill queue"
        )
        if not a.ok:
            return a.admission
        job = _Job(req, kv_target, route, on_event, a.seq_id, a.hit, kv_begin, sent=kv_begin)
        job.stream = KVStream(
            lambda p, retry: self._send(job, p, retry), self._transfers, lambda e: self._ended(job, e)
        )
        job.streams = o.kv_stream and streams_to(self.runtime, self.sender, kv_target)
        self.jobs[rid] = job
        tail = o.kv_stream_tail if job.streams and n - max(a.hit.tokens, kv_begin) > 2 * o.kv_stream_tail else 0
        self.batch.add(req, job.seq_id, self.decoder(req), done=a.hit.tokens, split_at=n - tail if tail else 0)
        return a.admission

    def _cancel(self, request_id: str) -> bool:
        job = self.jobs.get(request_id)
        if job is None or job.state in _TERMINAL:
            return False
        if job.stream.started:  # abort the stream, then cancel the send in flight
            job.stream.abort()
            self.sender.cancel(request_id)
        self._fail(job, ErrorKind.CANCELLED, "cancelled")
        return True

    def step(self) -> bool:
        if not self.batch.queue:
            return False
        self.faults.hit(Stage.PREFILL_FORWARD)
        firsts, failures = self.batch.step()
        self.steps += 1
        for f in failures:
            self._fail(self.jobs[f.request_id], ErrorKind.INTERNAL, f.message)
        for e in self.batch.queue:
            job = self.jobs[e.req.request_id]
            if e.t_start:
                job.state = PrefillState.PREFILLING
            if job.streams and e.item.done > job.sent:  # this step's tokens go while the next chunk computes
                self._ship(job, e.item.done, PARTIAL, final=False)
        for ft in firsts:
            self._after_prefill(self.jobs[ft.request_id], ft)
        return True

    def on_broken(self, error: BaseException) -> None:
        for job in list(self.jobs.values()):
            self._fail(job, ErrorKind.INTERNAL, f"prefill engine failed: {error}")

    def _after_prefill(self, job: _Job, ft: FirstToken) -> None:
        job.prefilled = True
        job.prefill_end = time.perf_counter()
        job.first = ft
        if not job.emit_first(ft.event):  # a piece of its KV failed for good: the failure is reported already
            return
        if ft.event.finish_reason is not None:  # the request ended with its first token: no KV to ship
            self._release(job, PrefillState.DONE)
            result = PrefillResult(job.req.request_id, ft.event, None, ft.queue_s, ft.prefill_s)
            job.report(dataclasses.replace(result, cached_tokens=job.hit.tokens, chunks=ft.chunks))
            return
        job.state = PrefillState.TRANSFERRING
        self.faults.hit(Stage.KV_EXPORT)
        try:
            self._ship(job, len(job.req.token_ids), encode_first_token(ft.event), final=True)
        except Exception as e:  # this request fails alone
            self._fail(job, ErrorKind.INTERNAL, f"KV export failed: {type(e).__name__}: {e}", ft.event)

    def _ship(self, job: _Job, end: int, meta: bytes, final: bool) -> None:
        """Queue KV tokens [job.sent, end) as the stream's next piece (engine thread: reads token positions)."""
        begin, rid = job.sent, job.req.request_id
        t0 = time.perf_counter()
        if scatters_to(self.runtime, job.route):
            build = scatter_later(self.runtime, self.sender, self._parts, job.seq_id, rid, begin, end, meta)
        else:
            build = export_later(self.runtime, self.sender, job.kv_target, job.seq_id, rid, begin, end, meta)
        job.export_s += time.perf_counter() - t0  # before the push: the transfer thread may run at once
        job.sent = end
        job.stream.push(Piece(build, final))

    def _send(self, job: _Job, payload: KVPayload | Scatter, retry: bool = False) -> TransferResult:
        """One send; a planned KV_SEND fault damages a first send (this stream only), never the retry. A scatter
        sends its parts, then (all acked) the manifest that commits them."""
        if retry:
            log.warning("KV transfer of %s failed; retrying the piece once", job.req.request_id)
        lease = self.options.kv_lease_s
        if isinstance(payload, Scatter):
            parts = payload.push(job.route, lease)
            if not parts.ok:
                return parts
            manifest = manifest_for(self.runtime, payload.begin, payload.end, job.req.request_id, payload.meta)
            m = self.sender.send(manifest, job.route.commit, lease)
            return dataclasses.replace(  # (the parts went first: times add up)
                m, nbytes=parts.nbytes, transfer_s=parts.transfer_s + m.transfer_s, import_s=parts.import_s + m.import_s
            )
        fault = None if retry else self.faults.hit(Stage.KV_SEND)
        self.faults.arm(job.req.request_id, fault)
        damaged = self.faults.damaged(fault, payload.k)
        sent = payload if damaged is payload.k else KVPayload(payload.header, damaged, payload.v)
        return self.sender.send(sent, job.kv_target, lease)

    def _ended(self, job: _Job, end: StreamEnd) -> None:  # transfer thread
        """The stream ended: the final piece is in, or a piece failed for good. Report at once: the decode worker
        may start as soon as the KV is in, not after our current prefill step."""
        rid, ft, result = job.req.request_id, job.first, end.result
        cancelled = job.state is PrefillState.CANCELLED
        error = None
        if cancelled:
            error = RequestError(rid, ErrorKind.CANCELLED, "cancelled")
        elif result is None:
            error = RequestError(rid, ErrorKind.INTERNAL, end.export_error or "KV export failed")
        elif not result.ok:
            if result.error is ErrorCode.TIMEOUT:
                self.lease_expired += 1  # a counter read by load(); one writer at a time is enough for it
                log.warning("KV lease of %s expired after %.0f s without an ack", rid, self.options.kv_lease_s)
            msg = f"KV transfer to {job.kv_target} failed: {result.error.value}: {result.message}"
            error = RequestError(rid, ErrorKind.TRANSFER_FAILED, msg)
        st = end.stats
        job.report(
            PrefillResult(
                rid,
                ft.event if ft is not None else None,
                error,
                ft.queue_s if ft is not None else 0.0,
                ft.prefill_s if ft is not None else 0.0,
                st.transfer_s,
                st.nbytes,
                st.retries,
                job.hit.tokens,
                export_s=job.export_s + st.export_s,
                import_s=st.import_s,
                tail_s=end.acked_at - job.prefill_end if ft is not None else 0.0,
                kv_pieces=st.pieces,
                chunks=ft.chunks if ft is not None else (),
            )
        )
        final = PrefillState.DONE if error is None else (PrefillState.CANCELLED if cancelled else PrefillState.FAILED)
        self._post_release(job, final)

    def _post_release(self, job: _Job, final: PrefillState) -> None:
        fut = self.post(lambda: self._release(job, final))
        if fut.cancelled() or (fut.done() and fut.exception() is not None):  # engine stopped: release inline
            self._release(job, final)

    def _fail(self, job: _Job, kind: ErrorKind, message: str, first: TokenEvent | None = None) -> None:
        rid = job.req.request_id
        self._release(job, PrefillState.CANCELLED if kind is ErrorKind.CANCELLED else PrefillState.FAILED)
        job.report(PrefillResult(rid, first, RequestError(rid, kind, message)))

    def _release(self, job: _Job, final: PrefillState) -> None:
        """The one release path: out of the queue; the sequence kept in the prefix cache (the prompt was
        prefilled) or freed with its pages; the job forgotten."""
        rid = job.req.request_id
        self.batch.drop(rid)
        if not job.stream.when_idle(lambda: self._post_release(job, final)):
            job.state = final  # a transfer thread still reads its pages: free them when it leaves
            return
        if not job.released:  # once: the cache's references are counted
            job.released = True
            self.cache.finish(job.seq_id, rid, job.hit, job.req.token_ids if job.prefilled else None)
        job.state = final
        if self.jobs.get(rid) is job:
            del self.jobs[rid]
