"""`DecodeBatch`: the decode half of an engine over one runtime (used by the decode worker and the colocated
engine): the running sequences, one `batch_decode` per step, per-request sampling and stop checks, streaming.

Call order (loop thread only): `add(running)` once a sequence's KV is in the cache and its last token known ->
`step()` each iteration -> sequences leave by themselves when finished, or through `finish(request_id, error)`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from decode_worker.scheduler import DecodeSeq, schedule_decode
from llama_relax.generation import SequenceDecoder
from llama_relax.runtime import ModelRuntime
from prefill_worker.loop import OutputStream
from prefill_worker.messages import ErrorKind, GenerationRequest, RequestError
from prefill_worker.pages import PagePool


@dataclass
class Running:
    """A sequence admitted to decoding. `length` counts tokens in the cache; `last_token` is the next input."""

    req: GenerationRequest
    seq_id: int
    decoder: SequenceDecoder
    out: OutputStream
    length: int
    last_token: int | None = None
    ready: bool = False  # KV in the cache and last_token known
    in_cache: bool = False  # the runtime holds a sequence for it


def release(runtime: ModelRuntime, pool: PagePool, r: Running, error: RequestError | None) -> None:
    """Free what a request holds (its sequence in the cache, its page reservation) and end its stream."""
    if r.in_cache:
        runtime.remove_sequence(r.seq_id)
    pool.release(r.req.request_id)
    if error is not None:
        r.out.put(error)


@dataclass
class DecodeBatch:
    runtime: ModelRuntime
    pool: PagePool
    max_batch: int = 16
    running: dict[str, Running] = field(default_factory=dict)  # admission order
    batch_sizes: Counter = field(default_factory=Counter)  # decode batch size -> steps (observability, tests)

    def add(self, r: Running) -> None:
        self.running[r.req.request_id] = r

    def finish(self, request_id: str, error: RequestError | None = None) -> bool:
        """Remove a running request: free its sequence and pages; push `error` as its terminal item if given."""
        r = self.running.pop(request_id, None)
        if r is None:
            return False
        release(self.runtime, self.pool, r, error)
        return True

    def step(self) -> bool:
        """schedule -> execute -> update for one token of every ready sequence. False if nothing was ready."""
        plan = schedule_decode(
            [DecodeSeq(rid, r.length, r.ready) for rid, r in self.running.items()], self.pool, self.max_batch
        )
        for rid in plan.evict:
            self.finish(rid, RequestError(rid, ErrorKind.EVICTED, "KV pages exhausted on the decode worker"))
        for rid, n in plan.grow:
            assert self.pool.reserve(rid, n), "scheduler granted pages that are not free"
        if not plan.batch:
            return bool(plan.evict)
        batch = [self.running[rid] for rid in plan.batch]
        try:
            logits = self.runtime.decode([r.seq_id for r in batch], [r.last_token for r in batch])  # [b, V]
        except Exception as e:  # the forward failed: these sequences' cache state is gone (runtime dropped them)
            for r in batch:
                r.in_cache = r.seq_id in self.runtime.sequence_ids()
                self.finish(r.req.request_id, RequestError(r.req.request_id, ErrorKind.INTERNAL, f"decode failed: {e}"))
            return True
        self.batch_sizes[len(batch)] += 1
        for r, row in zip(batch, logits, strict=True):
            r.length += 1
            event = r.decoder.sample_and_append(row)
            r.last_token = event.token_id
            r.out.put(event)
            if event.finish_reason is not None:
                self.finish(r.req.request_id)
        return True
