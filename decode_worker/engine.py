"""The decode worker: continuous batching with `batch_decode`, fed by KV imported from prefill workers.

Request lifecycle (`DecodeState`):
  1. RESERVED     `reserve(req)`: pages for the prompt + a first slice of output are set aside (or refused: BUSY).
  2. KV / FIRST   the KV arrives over the receiver (imported between steps on the engine thread) and the router
                  hands over the first token with `start_decoding(request_id, first_event)`; either may come first.
  3. DECODING     both are in: the sequence joins the running batch at the next step; each step samples one token
                  per sequence and streams it to the request's `OutputStream`.
  4. FINISHED / CANCELLED / FAILED   stop condition, `cancel(request_id)`, eviction or error: the sequence and its
                  pages are freed in the same step and the stream gets its terminal item.
Memory: the engine owns the runtime (one KV cache) and the receiver; streams are handed to the caller.
"""

from __future__ import annotations

import enum
import threading

from decode_worker.decode_batch import DecodeBatch, Running, release
from decode_worker.scheduler import admit_decode
from kvtransfer.payload import ErrorCode, KVHeader, PayloadError
from kvtransfer.runtime_io import import_into, make_receiver
from llama_relax.generation import SequenceDecoder, TokenEvent, TokenizerLike
from llama_relax.runtime import ModelRuntime
from prefill_worker.loop import EngineLoop, OutputStream
from prefill_worker.messages import ErrorKind, GenerationRequest, RequestError
from prefill_worker.pages import PagePool
from prefill_worker.scheduler import Admission


class DecodeState(enum.Enum):
    RESERVED = "reserved"
    DECODING = "decoding"


class DecodeEngine(EngineLoop):
    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        *,
        max_batch: int = 16,
        output_slice: int = 16,
        kv_host: str = "127.0.0.1",
        kv_port: int = 0,
    ) -> None:
        super().__init__("decode")
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.output_slice = output_slice
        self.pool = PagePool(runtime.free_pages(), runtime.kv_config.page_size)
        self.batch = DecodeBatch(runtime, self.pool, max_batch)
        self.max_seqs = min(runtime.kv_config.max_batch_size, max_batch * 4)
        self._pending: dict[str, Running] = {}  # reserved, not yet decoding
        self._unclaimed: dict[str, OutputStream] = {}  # streams not yet taken by `stream()` (may outlive the request)
        self._next_seq = 0
        self._lock = threading.Lock()
        self.receiver, self.kv_address = make_receiver(runtime, self._import, kv_host, kv_port, self._orphaned)

    # ---- control (any thread) -----------------------------------------------------------------------------
    def reserve(self, req: GenerationRequest) -> Admission:
        return self.call(lambda: self._reserve(req))

    def start_decoding(self, request_id: str, first: TokenEvent) -> None:
        """The first token (sampled by the prefill worker) is known; decoding may start once the KV is in."""
        self.call(lambda: self._start(request_id, first))

    def cancel(self, request_id: str) -> bool:
        return self.call(lambda: self._cancel(request_id, "cancelled by the client"))

    def stream(self, request_id: str) -> OutputStream:
        return self.call(lambda: self._stream(request_id))

    def state(self, request_id: str) -> DecodeState | None:
        return self.call(lambda: DecodeState.RESERVED if request_id in self._pending
                         else DecodeState.DECODING if request_id in self.batch.running else None)  # fmt: skip

    def load(self) -> dict[str, int]:
        """Running sequences, reservations and free pages (for the router's placement)."""
        return self.call(lambda: {"running": len(self.batch.running), "reserved": len(self._pending),
                                  "free_pages": self.pool.free, "total_pages": self.pool.total})  # fmt: skip

    def close(self) -> None:
        self.receiver.stop(0)
        self.stop()
        for rid in list(self._pending) + list(self.batch.running):
            self._cancel(rid, "decode worker shutting down")

    # ---- engine thread ------------------------------------------------------------------------------------
    def step(self) -> bool:
        return self.batch.step()

    def on_broken(self, error: BaseException) -> None:
        for rid in list(self._pending) + list(self.batch.running):
            self._cancel(rid, f"decode engine failed: {error}", ErrorKind.INTERNAL)

    def _reserve(self, req: GenerationRequest) -> Admission:
        rid = req.request_id
        if rid in self._pending or rid in self.batch.running:
            return Admission(False, f"request {rid} is already on this worker")
        n_seqs = len(self._pending) + len(self.batch.running)
        decision, pages = admit_decode(self.pool, n_seqs, self.max_seqs, len(req.prompt_ids),
                                       req.params.max_tokens, self.output_slice)  # fmt: skip
        if decision.ok:
            self.pool.reserve(rid, pages)
            self._next_seq += 1
            ctx = self.runtime.config.context_window_size
            decoder = SequenceDecoder(req.params, self.tokenizer, len(req.prompt_ids), ctx)
            self._pending[rid] = Running(req, self._next_seq, decoder, OutputStream(), length=0)
            self._unclaimed[rid] = self._pending[rid].out
        return decision

    def _start(self, request_id: str, first: TokenEvent) -> None:
        r = self._pending.get(request_id)
        if r is None:
            raise KeyError(f"no reservation for request {request_id}")
        r.decoder.append(first.token_id, first.logprobs)  # replay token 1: same stop/detok state as the sender
        r.last_token = first.token_id
        if first.finish_reason is not None:  # finished at the prefill worker: nothing to decode here
            self._cancel(request_id, "", None)
            return
        self._maybe_promote(r)

    def _maybe_promote(self, r: Running) -> None:
        if r.in_cache and r.last_token is not None:
            r.ready = True
            del self._pending[r.req.request_id]
            self.batch.add(r)

    def _stream(self, request_id: str) -> OutputStream:
        """Hand the request's stream to the caller (once); it may already hold every event up to the end."""
        stream = self._unclaimed.pop(request_id, None)
        if stream is None:
            raise KeyError(f"no request {request_id} on this worker (or its stream was already taken)")
        return stream

    def _cancel(self, request_id: str, message: str, kind: ErrorKind | None = ErrorKind.CANCELLED) -> bool:
        error = RequestError(request_id, kind, message) if kind is not None else None
        if kind is None:  # ended at the prefill worker: nobody will stream it
            self._unclaimed.pop(request_id, None)
        r = self._pending.pop(request_id, None)
        if r is not None:
            release(self.runtime, self.pool, r, error)
            return True
        return self.batch.finish(request_id, error)

    # ---- KV receiver callbacks (transport threads) -> engine thread ----------------------------------------
    def _import(self, header: KVHeader, k, v) -> None:
        def work() -> None:
            r = self._pending.get(header.request_id)
            if r is None:
                raise PayloadError(ErrorCode.IMPORT_FAILED, f"no reservation for request {header.request_id}")
            if header.end != len(r.req.prompt_ids):
                raise PayloadError(ErrorCode.SHAPE_MISMATCH, f"KV covers {header.end} tokens, the prompt has "
                                   f"{len(r.req.prompt_ids)}")  # fmt: skip
            import_into(self.runtime, r.seq_id, header, k, v)
            r.in_cache = True
            r.length = header.end
            self._maybe_promote(r)

        self.call(work)

    def _orphaned(self, header: KVHeader) -> None:
        self.post(
            lambda: self._cancel(header.request_id, "KV transfer abandoned by the sender", ErrorKind.TRANSFER_FAILED)
        )
