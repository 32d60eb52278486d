"""The decode engine: continuous batching with `batch_decode` over one runtime. Requests enter with their KV
from a prefill worker (`reserve` -> `import_kv`) or are prefilled here (`reserve` -> `prefill_local`: the colocated
engine, the baseline every disaggregation claim is measured against, is this engine fed only that way). `reserve`
hands the caller the request's stream with the answer: there is no stream to claim later.

Request lifecycle (`DecodeState`):
  1. RESERVED     `reserve(req)`: pages for the prompt + a first slice of output are set aside, less the pages
                  of the longest cached prefix its sequence is forked from (answered as `cached_tokens`: the KV
                  sent must start there); BUSY when full, INVALID for a duplicate id or a request that never fits.
     PREFILLING   `prefill_local(id)` of a reservation (colocated, a short uncached part, no prefill worker
                  alive): the prompt is prefilled here, chunk by chunk, each step before the decode step (neither
                  starves); its first token is sampled here and streamed.
  2. RECEIVING    the KV arrives over the worker's receiver, in order, in one piece or several (a prefill worker
                  streams each finished prompt chunk while it computes the next); each piece is imported between
                  steps on the engine thread. Only the last piece carries the first token: its import starts the
                  sequence decoding at once. A piece out of order is rejected (SHAPE_MISMATCH) and changes
                  nothing; a piece again (a retry whose ack was lost) is acknowledged without a second import.
                  With pipeline stages on either side a piece comes as parts (some layers each, held by the
                  `landing`: this worker, or its stages' own receivers) and then a manifest, whose import commits
                  the parts: every layer is checked to be held before any is appended (`kvtransfer.route`).
  3. DECODING     each step samples one token per running sequence and streams it to the request's `OutputStream`.
  4. FINISHED / CANCELLED / FAILED   stop condition, `cancel(request_id)`, eviction or error: in the same step
                  (`_end`, the one release path) a finished sequence (prompt + output) becomes a prefix-cache
                  entry, any other is freed with its pages, and the stream gets its terminal item.
Leases: a reservation whose KV has not come within `kv_lease_s` is ended and freed (TRANSFER_FAILED, counted in
`load().lease_expired`), so no page stays held for a request nobody serves. The lease runs from admission or from
the last KV piece imported: a long streamed prompt lives while its pieces come.
Memory: the engine (`EngineCore`) owns the page pool and prefix cache over the runtime's one KV cache; a stream is
the caller's from `reserve` on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.core import EngineCore
from engine.decode_batch import DecodeBatch, DecodeSequence, DecodeState
from engine.faults import FaultInjector, Stage
from engine.kvmeta import decode_first_token, is_partial
from engine.loop import OutputStream
from engine.messages import ADMITTED, Admission, ErrorKind, GenerationRequest, RequestError, WorkerLoad, WorkerOptions
from engine.prefill_batch import FirstToken, PrefillBatch
from engine.scheduler import decode_reservation
from engine.speculation import SpecMode
from kvtransfer.payload import ErrorCode, KVHeader, PayloadError
from kvtransfer.route import Landing
from kvtransfer.runtime_io import LocalLanding, import_into
from llama_relax.generation import TokenizerLike
from llama_relax.runtime import ModelRuntime
from llama_relax.spec_cost import StepCost, load_or_measure

_ENDED_BY = {ErrorKind.CANCELLED: DecodeState.CANCELLED}
_AWAITING_KV = frozenset({DecodeState.RESERVED, DecodeState.RECEIVING})  # one lease covers every piece
log = logging.getLogger(__name__)


class DecodeEngine(EngineCore):
    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        options: WorkerOptions,
        *,
        faults: FaultInjector | None = None,
        name: str = "decode",
        clock: Callable[[], float] = time.monotonic,
        step_cost: StepCost | None = None,
    ) -> None:
        super().__init__(name, runtime, tokenizer, options, faults)
        self.clock = clock  # the lease's clock (a test steps its own)
        self._next_lease_check = 0.0
        self.max_seqs = runtime.kv_config.max_batch_size  # requests held at once: each needs a cache sequence
        self.prefill = PrefillBatch(runtime, self.max_seqs)
        spec = options.speculative
        if spec is SpecMode.AUTO and runtime.pipeline_depth > 1:  # on pipeline stages `auto` keeps every stage
            spec = SpecMode.OFF  # busy with groups in flight (a verify step cannot overlap others)
        self.decode = DecodeBatch(
            runtime,
            self.pool,
            options.max_batch_size,
            spec,
            options.num_speculative_tokens,
            cost=step_cost or (load_or_measure(runtime, options.max_batch_size) if spec is SpecMode.AUTO else None),
        )
        self.seqs: dict[str, DecodeSequence] = {}  # every request held, admission order
        self.landing: Landing = (  # where KV parts wait for their manifest
            runtime
            if isinstance(runtime, Landing)
            else LocalLanding(runtime, max(runtime.kv_cache_bytes, 64 << 20), options.kv_lease_s)
        )

    # ---- control (any thread) -----------------------------------------------------------------------------
    def reserve(self, req: GenerationRequest) -> tuple[Admission, OutputStream | None]:
        """Set pages aside for a request whose KV (and first token) a prefill worker will push; when admitted, its
        stream: the events after token 1, or every event once `prefill_local` is called."""
        return self.call(lambda: self._admit(req))

    def prefill_local(self, request_id: str) -> Admission:
        """Prefill a reserved request here instead of waiting for its KV: its stream gets every event, token 1 too.
        Refused (UNAVAILABLE) when there is no reservation waiting for KV (its stream has its outcome already)."""

        def work() -> Admission:
            seq = self.seqs.get(request_id)
            if seq is None or seq.state not in _AWAITING_KV:
                why = "no reservation" if seq is None else f"it is {seq.state.value}"
                return Admission.refuse(ErrorKind.UNAVAILABLE, f"cannot prefill {request_id!r}: {why}")
            if seq.length > seq.hit.tokens:  # streamed pieces of an abandoned transfer: start clean
                self.runtime.popn(seq.seq_id, seq.length - seq.hit.tokens)
                seq.length, seq.last_piece = seq.hit.tokens, None
            self.landing.drop(request_id)  # and parts of one
            seq.state = DecodeState.PREFILLING
            self.prefill.add(seq.req, seq.seq_id, seq.decoder, done=seq.length)  # after its cached prefix
            return ADMITTED

        return self.call(work)

    def cancel(self, request_id: str) -> bool:
        def work() -> bool:
            seq = self.seqs.get(request_id)
            if seq is None:
                return False
            self._end(seq, RequestError(request_id, ErrorKind.CANCELLED, "cancelled by the client"))
            return True

        return self.call(work)

    def load(self, incarnation: str = "") -> WorkerLoad:
        def read() -> WorkerLoad:
            states = [s.state for s in self.seqs.values()]
            return self.core_load(
                incarnation,
                queued=len(self.prefill.queue),
                queued_tokens=self.prefill.queued_tokens,
                reserved=states.count(DecodeState.RESERVED) + states.count(DecodeState.RECEIVING),
                running=states.count(DecodeState.DECODING),
                max_batch_seen=max(self.decode.batch_sizes, default=0),
                spec_draft_tokens=self.decode.draft_tokens,
                spec_accepted_tokens=self.decode.accepted_tokens,
            )

        return self.call(read)

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
    def _admit(self, req: GenerationRequest) -> tuple[Admission, OutputStream | None]:
        """Admission: pages for the prompt and a first output slice, less the pages of the longest cached prefix,
        which the request's sequence is forked from (its KV is neither computed nor received again: the answer's
        `cached_tokens`). The reservation then waits for its KV, or for `prefill_local`."""
        n, o = len(req.token_ids), self.options
        a = self.admit_request(
            req,
            self.seqs,
            tokens=decode_reservation(n, req.params.max_tokens - len(req.resume_ids), o.output_slice),
            active=len(self.seqs),
            max_active=self.max_seqs,
            what=f"{self.name} engine",
            peak_tokens=len(req.prompt_ids) + req.params.max_tokens,
        )
        if not a.ok:
            return a.admission, None
        seq = DecodeSequence(
            req, a.seq_id, self.decoder(req), OutputStream(), DecodeState.RESERVED, length=a.hit.tokens, hit=a.hit
        )
        seq.t_lease = self.clock()
        self.decode.start(seq)
        self.seqs[req.request_id] = seq
        return a.admission, seq.out

    def _import(self, header: KVHeader, k, v) -> None:
        seq = self.seqs.get(header.request_id)
        if seq is None or seq.state not in _AWAITING_KV:
            raise PayloadError(ErrorCode.IMPORT_FAILED, f"no reservation for request {header.request_id}")
        if seq.last_piece == (header.begin, header.end):  # a retried piece whose first ack was lost: it is in
            return
        n, partial = len(seq.req.token_ids), is_partial(header.meta)
        if not header.is_manifest and header.num_layers != self.runtime.num_kv_layers:  # a part: held until its
            if header.begin < seq.length or header.end > n:  # manifest (the receiver checked its layers)
                raise PayloadError(
                    ErrorCode.SHAPE_MISMATCH,
                    f"a part of tokens [{header.begin}, {header.end}) of a "
                    f"{n}-token prompt whose first {seq.length} are here",
                )
            self.landing.hold(header, k, v)
            seq.t_lease = self.clock()
            return
        if (header.end >= n) if partial else (header.end != n):
            what = "a piece of the KV must end before" if partial else "the last piece of the KV must end at"
            raise PayloadError(ErrorCode.SHAPE_MISMATCH, f"{what} token {n}, this one ends at {header.end}")
        first = None if partial else decode_first_token(header.meta)
        if first is not None and first.finish_reason is not None:
            raise PayloadError(ErrorCode.MALFORMED, "a request that ended with its first token sends no KV")
        self.faults.hit(Stage.DECODE_IMPORT)
        if header.is_manifest:  # every layer of the piece is held (by this worker, or by each of its stages)
            self.landing.commit(seq.seq_id, header)
        else:
            import_into(self.runtime, seq.seq_id, header, k, v)  # SHAPE_MISMATCH unless it starts at seq.length
        seq.length, seq.last_piece = header.end, (header.begin, header.end)
        seq.t_lease = self.clock()  # a piece came: the lease runs from now
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
        if running or self.decode.flights:  # (a group in flight lands even when its sequences have all ended)
            self.faults.hit(Stage.DECODE_STEP)
            self.cache.evict(min(len(running), self.decode.max_batch))  # a step grows each sequence <= 1 page
            worked, ended = self.decode.step(running)
            did = did or worked
            for e in ended:
                self._end(e.seq, e.error)
        self.steps += did
        return did

    def _expire_leases(self) -> bool:
        """Free a reservation whose KV never came (or stopped coming) within the lease."""
        now, lease = self.clock(), self.options.kv_lease_s
        if now < self._next_lease_check:
            return False
        self._next_lease_check = now + min(1.0, lease / 4)
        late = [s for s in self.seqs.values() if s.state in _AWAITING_KV and now - s.t_lease > lease]
        for s in late:
            log.warning("%s: KV lease of %s expired (%s)", self.name, s.request_id, s.state.value)
            self._end(s, RequestError(s.request_id, ErrorKind.TRANSFER_FAILED, f"no KV within the {lease:g} s lease"))
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
        if seq.state in _AWAITING_KV or seq.last_piece is not None:  # parts of its KV may be held for a commit
            self.landing.drop(rid)  # that will not come (or parts sent again after a commit whose ack was lost)
        held = (seq.req.prompt_ids + tuple(seq.decoder.output_ids))[: seq.length]
        self.cache.finish(seq.seq_id, rid, seq.hit, held if error is None else None)
        seq.state = DecodeState.FINISHED if error is None else _ENDED_BY.get(error.kind, DecodeState.FAILED)
        if error is not None:
            seq.out.put(error)
