"""The decode engine: continuous batching with `batch_decode` over one runtime. Requests enter with their KV
from a prefill worker (`reserve` -> `import_kv`) or are prefilled here (`submit`: the colocated engine, the
baseline every disaggregation claim is measured against, is this engine fed only that way).

Request lifecycle (`DecodeState`):
  1. RESERVED     `reserve(req)`: pages for the prompt + a first slice of output are set aside, less the pages
                  of the longest cached prefix its sequence is forked from (answered as `cached_tokens`: the KV
                  sent must start there); BUSY when full, INVALID for a duplicate id or a request that never fits.
     PREFILLING   `submit(req)` (or `prefill_local(id)` of a reservation: no prefill worker alive): the same
                  admission, then the prompt is prefilled here, chunk by chunk, each step before the decode step
                  (neither starves); its first token is sampled here and streamed.
  2. RECEIVING    the KV arrives over the worker's receiver, in order, in one piece or several (a prefill worker
                  streams each finished prompt chunk while it computes the next); each piece is imported between
                  steps on the engine thread. Only the last piece carries the first token: its import starts the
                  sequence decoding at once. A piece out of order is rejected (SHAPE_MISMATCH) and changes
                  nothing; a piece again (a retry whose ack was lost) is acknowledged without a second import.
  3. DECODING     each step samples one token per running sequence and streams it to the request's `OutputStream`.
  4. FINISHED / CANCELLED / FAILED   stop condition, `cancel(request_id)`, eviction or error: in the same step
                  (`_end`, the one release path) a finished sequence (prompt + output) becomes a prefix-cache
                  entry, any other is freed with its pages, and the stream gets its terminal item.
Leases: a reservation whose KV has not come within `kv_lease_s`, and a request whose stream nobody claimed within
it, are ended and freed (counted in `load().lease_expired`), so no page stays held for a request nobody serves.
Both run from admission or from the last KV piece imported: a long streamed prompt lives while its pieces come.
Memory: the engine owns the runtime (one KV cache) and the page pool; streams are handed to the caller.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

from engine.decode_batch import DecodeBatch, DecodeSequence, DecodeState
from engine.faults import FaultInjector, FaultPlan, Stage
from engine.kvmeta import decode_first_token, is_partial
from engine.loop import EngineLoop, OutputStream
from engine.messages import Admission, ErrorKind, GenerationRequest, RequestError, WorkerLoad
from engine.pages import PagePool, pages_for
from engine.prefill_batch import FirstToken, PrefillBatch, make_decoder
from engine.prefix_cache import PrefixCache
from engine.scheduler import admit, decode_reservation
from kvtransfer.payload import ErrorCode, KVHeader, PayloadError
from kvtransfer.runtime_io import import_into
from llama_relax.generation import TokenizerLike
from llama_relax.runtime import ModelRuntime

_ENDED_BY = {ErrorKind.CANCELLED: DecodeState.CANCELLED}
_AWAITING_KV = frozenset({DecodeState.RESERVED, DecodeState.RECEIVING})  # one lease covers every piece
log = logging.getLogger(__name__)


class DecodeEngine(EngineLoop):
    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        *,
        max_batch: int = 16,
        output_slice: int = 16,
        token_budget: int = 0,
        kv_lease_s: float = 30.0,
        faults: FaultInjector | None = None,
        name: str = "decode",
        prefix_cache: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        self.clock = clock  # the leases' clock (a test steps its own)
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.output_slice = output_slice
        self.kv_lease_s = kv_lease_s  # a reservation without KV, or a stream nobody claims, is freed after it
        self.faults = faults or FaultInjector(FaultPlan())
        self.lease_expired = 0
        self.steps = 0
        self._next_lease_check = 0.0
        self.max_seqs = runtime.kv_config.max_batch_size  # requests held at once: each needs a cache sequence
        self.pool = PagePool(runtime.free_pages(), runtime.kv_config.page_size)
        self.prefill = PrefillBatch(runtime, self.max_seqs, token_budget)
        self.decode = DecodeBatch(runtime, self.pool, max_batch)
        self.cache = PrefixCache(runtime, self.pool, prefix_cache)  # finished sequences (prompt + output)
        self.seqs: dict[str, DecodeSequence] = {}  # every request held, admission order
        # streams not yet taken by `stream()`, with their admission time (they may outlive the request)
        self._unclaimed: dict[str, tuple[OutputStream, float]] = {}
        self._seq_ids = itertools.count(1)

    # ---- control (any thread) -----------------------------------------------------------------------------
    def reserve(self, req: GenerationRequest) -> Admission:
        """Set pages aside for a request whose KV (and first token) a prefill worker will push."""
        return self.call(lambda: self._admit(req, DecodeState.RESERVED))

    def submit(self, req: GenerationRequest) -> tuple[Admission, OutputStream | None]:
        """Prefill and decode `req` here; its stream (every event) when admitted."""

        def work() -> tuple[Admission, OutputStream | None]:
            decision = self._admit(req, DecodeState.PREFILLING)
            return decision, (self._unclaimed.pop(req.request_id)[0] if decision.ok else None)

        return self.call(work)

    def prefill_local(self, request_id: str) -> OutputStream:
        """Prefill a reserved request here instead of waiting for its KV; its stream (every event, token 1 too)."""

        def work() -> OutputStream:
            seq = self.seqs.get(request_id)
            if seq is None or seq.state not in _AWAITING_KV:
                stream = OutputStream()
                why = "no reservation" if seq is None else f"it is {seq.state.value}"
                stream.put(RequestError(request_id, ErrorKind.UNAVAILABLE, f"cannot prefill {request_id!r}: {why}"))
                return stream
            if seq.length > seq.hit.tokens:  # streamed pieces of an abandoned transfer: start clean
                self.runtime.popn(seq.seq_id, seq.length - seq.hit.tokens)
                seq.length, seq.last_piece = seq.hit.tokens, None
            seq.state = DecodeState.PREFILLING
            self.prefill.add(seq.req, seq.seq_id, seq.decoder, done=seq.length)  # after its cached prefix
            return self._unclaimed.pop(request_id, (seq.out, 0.0))[0]

        return self.call(work)

    def stream(self, request_id: str) -> OutputStream:
        """Hand the request's stream to the caller (once); it may already hold every event up to the end."""

        def claim() -> OutputStream:
            if request_id in self._unclaimed:
                return self._unclaimed.pop(request_id)[0]
            stream = OutputStream()  # e.g. a restarted worker: the request is gone, and the router migrates it
            stream.put(RequestError(request_id, ErrorKind.UNAVAILABLE, f"no request {request_id!r} on this worker"))
            return stream

        return self.call(claim)

    def cancel(self, request_id: str) -> bool:
        def work() -> bool:
            self._unclaimed.pop(request_id, None)  # whoever cancels does not want the events
            seq = self.seqs.get(request_id)
            if seq is None:
                return False
            self._end(seq, RequestError(request_id, ErrorKind.CANCELLED, "cancelled by the client"))
            return True

        return self.call(work)

    def load(self, incarnation: str = "") -> WorkerLoad:
        def read() -> WorkerLoad:
            states = [s.state for s in self.seqs.values()]
            return WorkerLoad(
                incarnation,
                queued=len(self.prefill.queue),
                queued_tokens=self.prefill.queued_tokens,
                reserved=states.count(DecodeState.RESERVED) + states.count(DecodeState.RECEIVING),
                running=states.count(DecodeState.DECODING),
                sequences=len(self.runtime.sequence_ids()) - len(self.cache.entries),
                free_pages=self.pool.free,
                total_pages=self.pool.total,
                max_batch_seen=max(self.decode.batch_sizes, default=0),
                lease_expired=self.lease_expired,
                steps=self.steps,
                cached_pages=self.cache.cached_pages,
                cached_prefixes=self.cache.prefixes(),
                prefix_hit_tokens=self.cache.hit_tokens,
                prefix_queried_tokens=self.cache.queried_tokens,
            )

        return self.call(read)

    def flush_cache(self) -> int:
        """Drop every prefix-cache entry no request uses; how many were dropped."""
        return self.call(self.cache.flush)

    def close(self) -> None:
        self.stop()
        self._fail_all(f"{self.name} worker shutting down")

    # ---- KV receiver callbacks (transport threads) -> engine thread ----------------------------------------
    def import_kv(self, header: KVHeader, k, v) -> None:
        """`ImportSink`: import a verified payload for a reserved request and start decoding it (blocks until
        done on the engine thread; a `PayloadError` leaves the cache as it was)."""
        self.call(lambda: self._import(header, k, v))

    def orphaned(self, header: KVHeader) -> None:
        """The sender went away after the commit while we imported: nobody will serve this request."""
        self.post(lambda: self._end_id(header.request_id, ErrorKind.TRANSFER_FAILED, "KV transfer abandoned"))

    # ---- engine thread ------------------------------------------------------------------------------------
    def _admit(self, req: GenerationRequest, state: DecodeState) -> Admission:
        """Admission for both ways in: pages for the prompt and a first output slice, less the pages of the
        longest cached prefix, which the request's sequence is forked from (its KV is neither computed nor
        received again: the answer's `cached_tokens`)."""
        rid, n = req.request_id, len(req.token_ids)
        tokens = decode_reservation(n, req.params.max_tokens - len(req.resume_ids), self.output_slice)
        hit = self.cache.claim(req.token_ids, tokens)
        decision = admit(
            self.pool,
            rid,
            self.seqs,
            tokens=tokens,
            active=len(self.seqs),
            max_active=self.max_seqs,
            what=f"{self.name} engine",
            peak_tokens=len(req.prompt_ids) + req.params.max_tokens,
            shared_pages=hit.shared_pages,
        )
        if not decision.ok:
            self.cache.unpin(hit)
            return decision
        self.pool.reserve(rid, pages_for(tokens, self.pool.page_size) - hit.shared_pages)
        decoder = make_decoder(req, self.tokenizer, self.runtime.config.context_window_size)
        seq = DecodeSequence(req, next(self._seq_ids), decoder, OutputStream(), state, length=hit.tokens, hit=hit)
        seq.t_admit = seq.t_lease = self.clock()
        self.cache.fork(hit, seq.seq_id, n)
        self.seqs[rid] = seq
        self._unclaimed[rid] = (seq.out, seq.t_admit)
        if state is DecodeState.PREFILLING:
            self.prefill.add(req, seq.seq_id, decoder, done=hit.tokens)
        return dataclasses.replace(decision, cached_tokens=hit.tokens)

    def _import(self, header: KVHeader, k, v) -> None:
        seq = self.seqs.get(header.request_id)
        if seq is None or seq.state not in _AWAITING_KV:
            raise PayloadError(ErrorCode.IMPORT_FAILED, f"no reservation for request {header.request_id}")
        if seq.last_piece == (header.begin, header.end):  # a retried piece whose first ack was lost: it is in
            return
        n, partial = len(seq.req.token_ids), is_partial(header.meta)
        if (header.end >= n) if partial else (header.end != n):
            what = "a piece of the KV must end before" if partial else "the last piece of the KV must end at"
            raise PayloadError(ErrorCode.SHAPE_MISMATCH, f"{what} token {n}, this one ends at {header.end}")
        first = None if partial else decode_first_token(header.meta)
        if first is not None and first.finish_reason is not None:
            raise PayloadError(ErrorCode.MALFORMED, "a request that ended with its first token sends no KV")
        self.faults.hit(Stage.DECODE_IMPORT)
        import_into(self.runtime, seq.seq_id, header, k, v)  # SHAPE_MISMATCH unless it starts at seq.length
        seq.length, seq.last_piece = header.end, (header.begin, header.end)
        seq.t_lease = self.clock()  # a piece came: the leases (KV, unclaimed stream) run from now
        if seq.request_id in self._unclaimed:
            self._unclaimed[seq.request_id] = (seq.out, seq.t_lease)
        if first is None:
            seq.state = DecodeState.RECEIVING
            return
        replay = seq.decoder.append(first.token_id, first.logprobs)  # same stop/detok state as the sender
        seq.last_token = first.token_id
        seq.state = DecodeState.DECODING
        if replay.finish_reason is not None:  # a tokenizer that disagrees with the prefill worker's
            self._end(seq, RequestError(seq.request_id, ErrorKind.INTERNAL, "decode state diverged at token 1"))

    def step(self) -> bool:
        did = self._expire_leases()
        if self.prefill.queue:
            did = True
            firsts, failures = self.prefill.step()
            for f in failures:
                self._end_id(f.request_id, ErrorKind.INTERNAL, f.message)
            for ft in firsts:
                self._start(ft)
        running = [s for s in self.seqs.values() if s.state is DecodeState.DECODING]
        if running:
            self.faults.hit(Stage.DECODE_STEP)
            self.cache.evict(min(len(running), self.decode.max_batch))  # a step grows each sequence <= 1 page
            worked, ended = self.decode.step(running)
            did = did or worked
            for e in ended:
                self._end(e.seq, e.error)
        self.steps += did
        return did

    def _expire_leases(self) -> bool:
        """Free a reservation whose KV never came, and a request whose stream nobody claimed, after the lease."""
        now = self.clock()
        if now < self._next_lease_check:
            return False
        self._next_lease_check = now + min(1.0, self.kv_lease_s / 4)
        late = [s for s in self.seqs.values() if s.state in _AWAITING_KV and now - s.t_lease > self.kv_lease_s]
        for s in late:
            self._end(
                s,
                RequestError(s.request_id, ErrorKind.TRANSFER_FAILED, f"no KV within the {self.kv_lease_s:g} s lease"),
            )
        stale = [rid for rid, (_, t) in self._unclaimed.items() if now - t > self.kv_lease_s]
        for rid in stale:
            del self._unclaimed[rid]
            if rid in self.seqs:
                late.append(self.seqs[rid])
                self._end(self.seqs[rid], RequestError(rid, ErrorKind.CANCELLED, "nobody claimed the stream"))
        for s in late:
            log.warning("%s: KV lease of %s expired (%s)", self.name, s.request_id, s.state.value)
        self.lease_expired += len(late)
        return bool(late)

    def _start(self, ft: FirstToken) -> None:
        """A prompt prefilled here: stream token 1; the sequence decodes from the next step on (in place)."""
        seq = self.seqs[ft.request_id]
        seq.out.put(ft.event)
        seq.length = len(ft.req.token_ids)
        seq.last_token = ft.event.token_id
        seq.state = DecodeState.DECODING
        if ft.event.finish_reason is not None:
            self._end(seq, None)

    def on_broken(self, error: BaseException) -> None:
        self._fail_all(f"{self.name} engine failed: {error}")

    def _fail_all(self, message: str) -> None:
        for seq in list(self.seqs.values()):
            self._end(seq, RequestError(seq.request_id, ErrorKind.INTERNAL, message))

    def _end_id(self, request_id: str, kind: ErrorKind, message: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self._end(seq, RequestError(request_id, kind, message))

    def _end(self, seq: DecodeSequence, error: RequestError | None) -> None:
        """The one release path: out of the prefill queue, the sequence kept in the prefix cache (it finished
        normally: prompt + output) or freed with its pages, terminal item streamed."""
        rid = seq.request_id
        if self.seqs.get(rid) is not seq:  # ended already (the cache's references are counted once)
            return
        del self.seqs[rid]
        self.prefill.drop(rid)
        held = (seq.req.prompt_ids + tuple(seq.decoder.output_ids))[: seq.length]
        self.cache.finish(seq.seq_id, rid, seq.hit, held if error is None else None)
        seq.state = DecodeState.FINISHED if error is None else _ENDED_BY.get(error.kind, DecodeState.FAILED)
        if error is not None:
            seq.out.put(error)
