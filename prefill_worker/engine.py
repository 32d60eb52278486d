"""The prefill worker: batched (and chunked) prefill, first token sampled here, then the KV is shipped.

Request lifecycle (`PrefillState`):
  1. QUEUED        `submit(req, kv_target, on_result)`: admitted if the queue has room and the prompt's pages can be
                   reserved, else refused at once (BUSY) - the queue never grows without bound.
  2. PREFILLING    each step packs waiting prompts into one forward of at most `token_budget` tokens
                   (`batch_forward_to_last_hidden_states` + `batch_select_last_hidden_states` + `get_logits`);
                   longer prompts continue over several steps.
  3. FIRST TOKEN   the last chunk's logits give token 1, sampled with the request's params; `on_first(event)`
                   reports it at once (this is what TTFT measures).
  4. TRANSFERRING  the KV is exported on the engine thread and pushed to the decode worker by a transfer thread,
                   so the engine keeps prefilling meanwhile.
  5. DONE / FAILED / CANCELLED   the receiver's ack (or failure / timeout / cancel) ends it: the sequence and its
                   pages are released on the engine thread and `on_result(PrefillResult)` is called exactly once.
Memory: the engine owns the runtime; a payload is owned by its transfer thread until the send returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtransfer.runtime_io import export_for
from kvtransfer.transport import KVSender
from llama_relax.generation import TokenEvent, TokenizerLike
from llama_relax.runtime import ModelRuntime
from prefill_worker.loop import EngineLoop
from prefill_worker.messages import ErrorKind, GenerationRequest, PrefillResult, RequestError
from prefill_worker.pages import PagePool
from prefill_worker.prefill_batch import FirstToken, PrefillBatch
from prefill_worker.scheduler import Admission


class PrefillState(enum.Enum):
    QUEUED = "queued"
    TRANSFERRING = "transferring"


@dataclass
class _Job:
    req: GenerationRequest
    kv_target: str
    on_result: Callable[[PrefillResult], None]
    on_first: Callable[[TokenEvent], None] | None
    state: PrefillState = PrefillState.QUEUED
    cancelled: bool = False
    reported: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, result: PrefillResult) -> None:
        """Deliver the result exactly once, from whichever thread gets there first."""
        with self.lock:
            if self.reported:
                return
            self.reported = True
        self.on_result(result)


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
        transfer_timeout_s: float = 60.0,
        transfer_threads: int = 2,
    ) -> None:
        super().__init__("prefill")
        self.runtime = runtime
        self.sender = sender
        self.transfer_timeout_s = transfer_timeout_s
        self.pool = PagePool(runtime.free_pages(), runtime.kv_config.page_size)
        self.batch = PrefillBatch(runtime, tokenizer, self.pool, max_queue, max_seqs, token_budget)
        self.jobs: dict[str, _Job] = {}
        self._transfers = cf.ThreadPoolExecutor(transfer_threads, thread_name_prefix="kv-send")

    # ---- control (any thread) -----------------------------------------------------------------------------
    def submit(
        self,
        req: GenerationRequest,
        kv_target: str,
        on_result: Callable[[PrefillResult], None],
        on_first: Callable[[TokenEvent], None] | None = None,
    ) -> Admission:
        return self.call(lambda: self._submit(_Job(req, kv_target, on_result, on_first)))

    def cancel(self, request_id: str) -> bool:
        return self.call(lambda: self._cancel(request_id))

    def load(self) -> dict[str, int]:
        return self.call(lambda: {"queued": len(self.batch.queue), "transferring": len(self.jobs) - len(self.batch.queue),
                                  "queued_tokens": sum(e.item.remaining for e in self.batch.queue),
                                  "free_pages": self.pool.free, "total_pages": self.pool.total})  # fmt: skip

    def close(self) -> None:
        self.stop()
        self._transfers.shutdown(wait=True)
        for rid in list(self.jobs):
            self._fail(rid, ErrorKind.INTERNAL, "prefill worker shutting down")

    # ---- engine thread ------------------------------------------------------------------------------------
    def _submit(self, job: _Job) -> Admission:
        rid = job.req.request_id
        if rid in self.jobs:
            return Admission(False, f"request {rid} is already on this worker")
        decision = self.batch.admit(job.req)
        if decision.ok:
            self.jobs[rid] = job
        return decision

    def _cancel(self, request_id: str) -> bool:
        job = self.jobs.get(request_id)
        if job is None:
            return False
        if job.state is PrefillState.QUEUED:
            self.batch.drop(request_id)
            self._finish(request_id, PrefillResult(request_id, None, RequestError(request_id, ErrorKind.CANCELLED,
                                                                                 "cancelled")))  # fmt: skip
        else:  # in flight: the transfer thread sees the flag / the sender's cancel and reports
            job.cancelled = True
            self.sender.cancel(request_id)
        return True

    def step(self) -> bool:
        if not self.batch.queue:
            return False
        for first in self.batch.step():
            self._after_prefill(first)
        return True

    def on_broken(self, error: BaseException) -> None:
        for rid in list(self.jobs):
            self._fail(rid, ErrorKind.INTERNAL, f"prefill engine failed: {error}")

    def _after_prefill(self, ft: FirstToken) -> None:
        job = self.jobs[ft.request_id]
        if job.on_first is not None:
            job.on_first(ft.event)
        if ft.event.finish_reason is not None:  # the request ended with its first token: no KV to ship
            self.batch.release(ft.request_id, ft.seq_id)
            self._finish(ft.request_id, PrefillResult(ft.request_id, ft.event, None, ft.queue_s, ft.prefill_s))
            return
        job.state = PrefillState.TRANSFERRING
        payload = export_for(self.runtime, self.sender, job.kv_target, ft.seq_id, ft.request_id)
        self._transfers.submit(self._transfer, job, ft, payload)

    def _transfer(self, job: _Job, ft: FirstToken, payload) -> None:  # transfer thread
        result = self.sender.send(payload, job.kv_target, self.transfer_timeout_s)
        del payload
        rid = ft.request_id
        if result.ok and not job.cancelled:
            outcome = PrefillResult(rid, ft.event, None, ft.queue_s, ft.prefill_s, result.transfer_s, result.nbytes)
        else:
            kind = ErrorKind.CANCELLED if job.cancelled else ErrorKind.TRANSFER_FAILED
            msg = (
                f"KV transfer to {job.kv_target} failed: {result.error}: {result.message}"
                if not result.ok
                else "cancelled"
            )
            outcome = PrefillResult(rid, ft.event, RequestError(rid, kind, msg), ft.queue_s, ft.prefill_s,
                                    result.transfer_s, result.nbytes)  # fmt: skip
        # Report at once: the decode worker may start as soon as the KV is in, not after our current prefill
        # step (waiting for the engine thread here put a whole prefill step between tokens 1 and 2).
        job.report(outcome)

        def release() -> None:
            self.batch.release(rid, ft.seq_id)
            self.jobs.pop(rid, None)

        fut = self.post(release)
        if fut.cancelled() or (fut.done() and fut.exception() is not None):  # engine stopped: release inline
            release()

    def _fail(self, request_id: str, kind: ErrorKind, message: str) -> None:
        if self.batch.drop(request_id) or request_id in self.jobs:
            self._finish(request_id, PrefillResult(request_id, None, RequestError(request_id, kind, message)))

    def _finish(self, request_id: str, result: PrefillResult) -> None:
        job = self.jobs.pop(request_id, None)
        if job is not None:
            job.report(result)
