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
  3. TRANSFERRING  the last chunk's logits give token 1; `on_event(event)` reports it at once (TTFT), the KV is
                   exported on the engine thread with token 1 in its header, and a transfer thread pushes it to the
                   decode worker, so the engine keeps prefilling meanwhile.
                   A transport failure (reset, checksum, truncated stream) is retried once; a send not acked within
                   `kv_lease_s` gives up (the lease expired) and the exported KV is freed.
  4. DONE / FAILED / CANCELLED   the receiver's ack (or a failure / timeout / cancel) ends it: `on_event` gets the
                   `PrefillResult` exactly once, then on the engine thread the prefilled sequence becomes a
                   prefix-cache entry (one whose forward failed is freed with its pages).
A request with `resume_ids` (a migration) prefills prompt + resume_ids and samples the token after them.
Memory: the engine owns the runtime and the page pool; a payload is owned by its transfer thread until the send
returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.faults import FaultInjector, FaultPlan, Stage
from engine.kvmeta import encode_first_token
from engine.loop import EngineLoop
from engine.messages import Admission, ErrorKind, GenerationRequest, PrefillResult, RequestError, WorkerLoad
from engine.pages import PagePool, pages_for
from engine.prefill_batch import FirstToken, PrefillBatch, make_decoder
from engine.prefix_cache import MISS, Hit, PrefixCache
from engine.scheduler import admit
from kvtransfer.payload import ErrorCode, KVPayload
from kvtransfer.runtime_io import export_for
from kvtransfer.transport import KVSender, TransferResult
from llama_relax.generation import TokenEvent, TokenizerLike
from llama_relax.runtime import ModelRuntime


class PrefillState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a transferring job stays listed in this state until its send returns


PrefillEvent = TokenEvent | PrefillResult
# transport failures worth one more try (a rejection by the receiver, a lease that ran out or a cancel are not)
RETRYABLE = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.CHECKSUM_MISMATCH, ErrorCode.TRUNCATED, ErrorCode.CANCELLED, ErrorCode.BUSY}
)
log = logging.getLogger(__name__)
_TERMINAL = frozenset({PrefillState.DONE, PrefillState.FAILED, PrefillState.CANCELLED})


@dataclass
class _Job:
    req: GenerationRequest
    kv_target: str
    on_event: Callable[[PrefillEvent], None]
    seq_id: int
    hit: Hit = MISS  # the cached prefix its sequence was forked from: only the rest is computed
    kv_begin: int = 0  # the decode worker holds the tokens before this: only [kv_begin, n) is sent
    prefilled: bool = False  # its sequence holds the whole prompt (kept in the prefix cache when released)
    released: bool = False
    state: PrefillState = PrefillState.QUEUED
    prefill_end: float = 0.0  # perf_counter when its first token was sampled (the KV hand-off starts)
    export_s: float = 0.0
    _reported: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, result: PrefillResult) -> None:
        """Deliver the result exactly once, from whichever thread gets there first."""
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self.on_event(result)


class PrefillEngine(EngineLoop):
    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        sender: KVSender,
        *,
        max_queue: int = 64,
        max_seqs: int = 16,
        token_budget: int = 0,
        kv_lease_s: float = 30.0,
        transfer_threads: int = 2,
        faults: FaultInjector | None = None,
        prefix_cache: bool = True,
    ) -> None:
        super().__init__("prefill")
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.sender = sender
        self.max_queue = max_queue
        self.kv_lease_s = kv_lease_s  # a send not acked within it fails, and the exported KV is freed
        self.faults = faults or FaultInjector(FaultPlan())
        self.lease_expired = 0
        self.steps = 0
        self.pool = PagePool(runtime.free_pages(), runtime.kv_config.page_size)
        self.batch = PrefillBatch(runtime, max_seqs, token_budget)
        self.cache = PrefixCache(runtime, self.pool, prefix_cache)  # prefilled prompts
        self.jobs: dict[str, _Job] = {}
        self._seq_ids = itertools.count(1)
        self._transfers = cf.ThreadPoolExecutor(transfer_threads, thread_name_prefix="kv-send")

    # ---- control (any thread) -----------------------------------------------------------------------------
    def submit(
        self, req: GenerationRequest, kv_target: str, on_event: Callable[[PrefillEvent], None], kv_begin: int = 0
    ) -> Admission:
        """Queue `req`; `on_event` gets its first `TokenEvent` (unless the forward fails), then one `PrefillResult`.
        The decode worker already holds the first `kv_begin` tokens (its prefix cache): only the rest is sent."""
        return self.call(lambda: self._submit(req, kv_target, on_event, kv_begin))

    def flush_cache(self) -> int:
        """Drop every prefix-cache entry no request uses; how many were dropped."""
        return self.call(self.cache.flush)

    def cancel(self, request_id: str) -> bool:
        return self.call(lambda: self._cancel(request_id))

    def load(self, incarnation: str = "") -> WorkerLoad:
        def read() -> WorkerLoad:
            transferring = sum(
                j.state is not PrefillState.QUEUED and j.state is not PrefillState.PREFILLING
                for j in self.jobs.values()
            )
            return WorkerLoad(
                incarnation,
                queued=len(self.batch.queue),
                queued_tokens=self.batch.queued_tokens,
                transferring=transferring,
                sequences=len(self.runtime.sequence_ids()) - len(self.cache.entries),
                free_pages=self.pool.free,
                total_pages=self.pool.total,
                lease_expired=self.lease_expired,
                steps=self.steps,
                cached_pages=self.cache.cached_pages,
                cached_prefixes=self.cache.prefixes(),
                prefix_hit_tokens=self.cache.hit_tokens,
                prefix_queried_tokens=self.cache.queried_tokens,
            )

        return self.call(read)

    def close(self) -> None:
        self.stop()
        self._transfers.shutdown(wait=True)
        for job in list(self.jobs.values()):
            self._fail(job, ErrorKind.INTERNAL, "prefill worker shutting down")

    # ---- engine thread ------------------------------------------------------------------------------------
    def _submit(
        self, req: GenerationRequest, kv_target: str, on_event: Callable[[PrefillEvent], None], kv_begin: int
    ) -> Admission:
        rid, n = req.request_id, len(req.token_ids)
        if not 0 <= kv_begin < n:
            return Admission.refuse(ErrorKind.INVALID, f"kv_begin must be in [0, {n}) for a {n}-token prompt")
        hit = self.cache.claim(req.token_ids, n)
        decision = admit(
            self.pool,
            rid,
            self.jobs,
            tokens=n,
            active=len(self.batch.queue),
            max_active=self.max_queue,
            what="prefill queue",
            shared_pages=hit.shared_pages,
        )
        if not decision.ok:
            self.cache.unpin(hit)
            return decision
        self.pool.reserve(rid, pages_for(n, self.pool.page_size) - hit.shared_pages)
        job = _Job(req, kv_target, on_event, next(self._seq_ids), hit, kv_begin)
        self.cache.fork(hit, job.seq_id, n)
        self.jobs[rid] = job
        decoder = make_decoder(req, self.tokenizer, self.runtime.config.context_window_size)
        self.batch.add(req, job.seq_id, decoder, done=hit.tokens)
        return dataclasses.replace(decision, cached_tokens=hit.tokens)

    def _cancel(self, request_id: str) -> bool:
        job = self.jobs.get(request_id)
        if job is None or job.state in _TERMINAL:
            return False
        if job.state is PrefillState.TRANSFERRING:  # the transfer thread sees the state / the sender's cancel
            job.state = PrefillState.CANCELLED
            self.sender.cancel(request_id)
        else:
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
            if e.t_start:
                self.jobs[e.req.request_id].state = PrefillState.PREFILLING
        for ft in firsts:
            self._after_prefill(self.jobs[ft.request_id], ft)
        return True

    def on_broken(self, error: BaseException) -> None:
        for job in list(self.jobs.values()):
            self._fail(job, ErrorKind.INTERNAL, f"prefill engine failed: {error}")

    def _after_prefill(self, job: _Job, ft: FirstToken) -> None:
        job.prefilled = True
        job.prefill_end = time.perf_counter()
        job.on_event(ft.event)
        if ft.event.finish_reason is not None:  # the request ended with its first token: no KV to ship
            self._release(job, PrefillState.DONE)
            result = PrefillResult(job.req.request_id, ft.event, None, ft.queue_s, ft.prefill_s)
            job.report(dataclasses.replace(result, cached_tokens=job.hit.tokens))
            return
        job.state = PrefillState.TRANSFERRING
        self.faults.hit(Stage.KV_EXPORT)
        try:
            meta = encode_first_token(ft.event)
            payload = export_for(
                self.runtime, self.sender, job.kv_target, ft.seq_id, ft.request_id, meta=meta, begin=job.kv_begin
            )
        except Exception as e:  # this request fails alone
            self._fail(job, ErrorKind.INTERNAL, f"KV export failed: {type(e).__name__}: {e}", ft.event)
            return
        job.export_s = time.perf_counter() - job.prefill_end
        self._transfers.submit(self._transfer, job, ft, payload)

    def _send(self, job: _Job, payload: KVPayload, retry: bool = False) -> TransferResult:
        """One send; a planned KV_SEND fault damages a first send (this stream only), never the retry."""
        fault = None if retry else self.faults.hit(Stage.KV_SEND)
        self.faults.arm(job.req.request_id, fault)
        damaged = self.faults.damaged(fault, payload.k)
        sent = payload if damaged is payload.k else KVPayload(payload.header, damaged, payload.v)
        return self.sender.send(sent, job.kv_target, self.kv_lease_s)

    def _transfer(self, job: _Job, ft: FirstToken, payload: KVPayload) -> None:  # transfer thread
        """Send the KV; a transport failure is retried once; a send not acked within the lease gives up."""
        result, retries = self._send(job, payload), 0
        if not result.ok and result.error in RETRYABLE and job.state is not PrefillState.CANCELLED:
            log.warning("KV transfer of %s failed (%s: %s); retrying once", ft.request_id, result.error, result.message)
            result, retries = self._send(job, payload, retry=True), 1
        del payload
        rid = ft.request_id
        cancelled = job.state is PrefillState.CANCELLED
        error = None
        if cancelled:
            error = RequestError(rid, ErrorKind.CANCELLED, "cancelled")
        elif not result.ok:
            if result.error is ErrorCode.TIMEOUT:
                self.lease_expired += 1  # a counter read by load(); one writer at a time is enough for it
                log.warning("KV lease of %s expired after %.0f s without an ack", rid, self.kv_lease_s)
            msg = f"KV transfer to {job.kv_target} failed: {result.error.value}: {result.message}"
            error = RequestError(rid, ErrorKind.TRANSFER_FAILED, msg)
        # Report at once: the decode worker may start as soon as the KV is in, not after our current prefill
        # step (waiting for the engine thread here put a whole prefill step between tokens 1 and 2).
        job.report(
            PrefillResult(
                rid,
                ft.event,
                error,
                ft.queue_s,
                ft.prefill_s,
                result.transfer_s,
                result.nbytes,
                retries,
                job.hit.tokens,
                export_s=job.export_s,
                import_s=result.import_s,
                tail_s=time.perf_counter() - job.prefill_end,
            )
        )
        final = PrefillState.DONE if error is None else (PrefillState.CANCELLED if cancelled else PrefillState.FAILED)
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
        if not job.released:  # once: the cache's references are counted
            job.released = True
            self.cache.finish(job.seq_id, rid, job.hit, job.req.token_ids if job.prefilled else None)
        job.state = final
        if self.jobs.get(rid) is job:
            del self.jobs[rid]
