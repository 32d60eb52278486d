"""The colocated engine: prefill and decode on one runtime and one KV cache - the baseline that every
disaggregation claim is measured against, built from the same parts as the two workers.

Request lifecycle:
  1. QUEUED     `submit(req)`: admitted if the queue has room and pages for the prompt + a first slice of output
                can be reserved (else refused: BUSY); the caller gets the request's `OutputStream`.
  2. PREFILL    each step first runs one prefill forward of waiting prompt slices (chunked, token budget), then one
                decode step: decode steps interleave with prefill chunks, so neither starves.
  3. DECODING   after its first token a sequence joins the running batch in place (no KV copy).
  4. FINISHED / CANCELLED / FAILED   as in the decode worker; pages freed in the same step.
"""

from __future__ import annotations

from decode_worker.decode_batch import DecodeBatch, Running
from llama_relax.generation import TokenizerLike
from llama_relax.runtime import ModelRuntime
from prefill_worker.loop import EngineLoop, OutputStream
from prefill_worker.messages import ErrorKind, GenerationRequest, RequestError
from prefill_worker.pages import PagePool
from prefill_worker.prefill_batch import PrefillBatch
from prefill_worker.scheduler import Admission


class ColocatedEngine(EngineLoop):
    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        output_slice: int = 16,
        token_budget: int = 0,
    ) -> None:
        super().__init__("colocated")
        self.runtime = runtime
        self.output_slice = output_slice
        self.pool = PagePool(runtime.free_pages(), runtime.kv_config.page_size)
        max_seqs = runtime.kv_config.max_batch_size
        self.prefill = PrefillBatch(runtime, tokenizer, self.pool, max_queue, max_seqs, token_budget)
        self.decode = DecodeBatch(runtime, self.pool, max_batch)
        self.streams: dict[str, OutputStream] = {}

    def submit(self, req: GenerationRequest) -> tuple[Admission, OutputStream | None]:
        return self.call(lambda: self._submit(req))

    def cancel(self, request_id: str) -> bool:
        return self.call(lambda: self._cancel(request_id, ErrorKind.CANCELLED, "cancelled by the client"))

    def load(self) -> dict[str, int]:
        return self.call(lambda: {"queued": len(self.prefill.queue), "running": len(self.decode.running),
                                  "free_pages": self.pool.free, "total_pages": self.pool.total})  # fmt: skip

    def close(self) -> None:
        self.stop()
        for rid in list(self.streams):
            self._cancel(rid, ErrorKind.INTERNAL, "engine shutting down")

    # ---- engine thread ------------------------------------------------------------------------------------
    def _submit(self, req: GenerationRequest) -> tuple[Admission, OutputStream | None]:
        rid = req.request_id
        if rid in self.streams:
            return Admission(False, f"request {rid} is already on this engine"), None
        if len(self.streams) >= self.runtime.kv_config.max_batch_size:
            return Admission(False, f"engine full ({self.runtime.kv_config.max_batch_size} sequences)"), None
        decision = self.prefill.admit(req)
        if not decision.ok:
            return decision, None
        if not self.pool.ensure(rid, len(req.prompt_ids) + min(req.params.max_tokens, self.output_slice)):
            self.prefill.drop(rid)
            return Admission(False, f"KV pages exhausted ({self.pool.free} free)"), None
        self.streams[rid] = OutputStream()
        return decision, self.streams[rid]

    def _cancel(self, request_id: str, kind: ErrorKind, message: str) -> bool:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return False
        if not self.prefill.drop(request_id):
            self.decode.finish(request_id)
        stream.put(RequestError(request_id, kind, message))
        return True

    def step(self) -> bool:
        did = False
        if self.prefill.queue:
            did = True
            for ft in self.prefill.step():
                stream = self.streams[ft.request_id]
                stream.put(ft.event)
                if ft.event.finish_reason is not None:
                    self.prefill.release(ft.request_id, ft.seq_id)
                    del self.streams[ft.request_id]
                    continue
                req = ft.req
                self.decode.add(Running(req, ft.seq_id, ft.decoder, stream, length=len(req.prompt_ids),
                                        last_token=ft.event.token_id, ready=True, in_cache=True))  # fmt: skip
        running_before = set(self.decode.running)
        if self.decode.step():
            did = True
        for rid in running_before - set(self.decode.running):  # finished or evicted this step
            self.streams.pop(rid, None)
        return did

    def on_broken(self, error: BaseException) -> None:
        for rid in list(self.streams):
            self._cancel(rid, ErrorKind.INTERNAL, f"engine failed: {error}")
