"""`DecodeBatch`: the decode half of an engine over one runtime: one `batch_decode` per step over the running
sequences, per-request sampling and stop checks, streaming.

Call order (engine thread only): the engine passes its DECODING sequences (admission order) to `step(running)`
each iteration -> the batch grows their page reservations, decodes one token each and streams it to the
sequence's `OutputStream` -> it returns the sequences that ended in this step (finished, evicted or failed), and the
engine releases them (its one release path). The batch frees only what eviction must free before the forward: an
evicted sequence's reservation and its sequence in the runtime, so the pages it held are there for the others."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from engine.loop import OutputStream
from engine.messages import ErrorKind, GenerationRequest, RequestError
from engine.pages import PagePool
from engine.prefix_cache import MISS, Hit
from engine.scheduler import DecodeSeq, schedule_decode
from llama_relax.generation import SequenceDecoder
from llama_relax.runtime import ModelRuntime


class DecodeState(enum.Enum):
    """A request's state on a decode (or colocated) engine."""

    RESERVED = "reserved"  # pages set aside; its KV and first token come from a prefill worker
    RECEIVING = "receiving"  # some pieces of its KV are in; the last one (with the first token) starts it
    PREFILLING = "prefilling"  # queued for (or in) a prefill on this engine
    DECODING = "decoding"  # in the running batch
    FINISHED = "finished"  # stop condition reached
    CANCELLED = "cancelled"
    FAILED = "failed"  # evicted, transfer abandoned, forward failed


@dataclass
class DecodeSequence:
    """A request held by a decode engine. `length` counts its tokens in the cache; `last_token` is the next input
    (the last sampled token, not yet in the cache)."""

    req: GenerationRequest
    seq_id: int
    decoder: SequenceDecoder
    out: OutputStream
    state: DecodeState
    length: int = 0
    last_token: int | None = None
    hit: Hit = MISS  # the cached prefix its sequence was forked from (its first `hit.tokens` tokens)
    last_piece: tuple[int, int] | None = None  # token range of the last KV piece imported
    t_lease: float = 0.0  # the KV lease runs from here: admission, or the last piece (the engine's clock)

    @property
    def request_id(self) -> str:
        return self.req.request_id


@dataclass(frozen=True)
class Ended:
    """A sequence that left the batch this step: `error` is None when it finished normally."""

    seq: DecodeSequence
    error: RequestError | None


class DecodeBatch:
    def __init__(self, runtime: ModelRuntime, pool: PagePool, max_batch: int) -> None:
        self.runtime = runtime
        self.pool = pool
        self.max_batch = max_batch
        self.batch_sizes: Counter[int] = Counter()  # decode batch size -> steps (observability, tests)

    def step(self, running: Sequence[DecodeSequence]) -> tuple[bool, list[Ended]]:
        """schedule -> execute -> update for one token of each running sequence (up to `max_batch`).

        Returns (did work, the sequences that ended)."""
        by_id = {s.request_id: s for s in running}
        plan = schedule_decode(
            [DecodeSeq(s.request_id, s.length, s.hit.shared_pages) for s in running], self.pool, self.max_batch
        )
        ended = [
            Ended(by_id[rid], RequestError(rid, ErrorKind.EVICTED, "KV pages exhausted on the decode worker"))
            for rid in plan.evict
        ]
        for rid in plan.evict:  # the victim's pages go to the sequences that stay, in the real cache too
            self.pool.release(rid)
            self.runtime.remove_sequence(by_id[rid].seq_id)
        for rid, n in plan.grow:
            if not self.pool.reserve(rid, n):
                raise RuntimeError(f"decode scheduler granted {n} pages to {rid} that are not free")
        if not plan.batch:
            return bool(ended), ended
        batch = [by_id[rid] for rid in plan.batch]
        try:
            logits = self.runtime.decode([s.seq_id for s in batch], [s.last_token for s in batch])  # [b, V]
        except Exception as e:  # the forward failed: the runtime dropped these sequences; they fail alone
            msg = f"decode failed: {type(e).__name__}: {e}"
            return True, ended + [Ended(s, RequestError(s.request_id, ErrorKind.INTERNAL, msg)) for s in batch]
        self.batch_sizes[len(batch)] += 1
        for s, row in zip(batch, logits, strict=True):
            s.length += 1
            event = s.decoder.sample_and_append(row)
            s.last_token = event.token_id
            s.out.put(event)
            if event.finish_reason is not None:
                ended.append(Ended(s, None))
        return True, ended
