"""`PrefillBatch`: the prefill half of an engine over one runtime (used by the prefill worker and the colocated
engine): a FIFO of admitted prompts, one batched forward per step, first tokens sampled on the spot.

Call order (loop thread only): `admit(req)` -> `step()` until the request's first token comes back ->
`release(request_id)` when the caller is done with its sequence (after the KV left, or at once)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llama_relax.generation import SequenceDecoder, TokenEvent, TokenizerLike
from llama_relax.runtime import ModelRuntime
from prefill_worker.messages import GenerationRequest
from prefill_worker.pages import PagePool, pages_for
from prefill_worker.scheduler import Admission, PrefillItem, admit_prefill, completes_prompt, schedule_prefill


@dataclass
class PrefillEntry:
    req: GenerationRequest
    seq_id: int
    item: PrefillItem
    t_admit: float
    t_start: float = 0.0
    decoder: SequenceDecoder | None = None


@dataclass(frozen=True)
class FirstToken:
    """A prompt finished prefilling; `event` is its first output token."""

    request_id: str
    req: GenerationRequest
    seq_id: int
    event: TokenEvent
    decoder: SequenceDecoder
    queue_s: float
    prefill_s: float


@dataclass
class PrefillBatch:
    runtime: ModelRuntime
    tokenizer: TokenizerLike | None
    pool: PagePool
    max_queue: int = 64
    max_seqs: int = 16
    token_budget: int = 0  # 0: the runtime's prefill chunk
    queue: list[PrefillEntry] = field(default_factory=list)
    _next_seq: int = 1

    def __post_init__(self) -> None:
        self.token_budget = self.token_budget or self.runtime.prefill_chunk_size

    def new_seq_id(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def admit(self, req: GenerationRequest, seq_id: int | None = None) -> Admission:
        """Queue a request and reserve its prompt's pages, or refuse (queue full / pages exhausted)."""
        decision = admit_prefill(len(self.queue), self.max_queue, self.pool, len(req.prompt_ids))
        if decision.ok:
            self.pool.reserve(req.request_id, pages_for(len(req.prompt_ids), self.pool.page_size))
            sid = seq_id if seq_id is not None else self.new_seq_id()
            self.queue.append(
                PrefillEntry(req, sid, PrefillItem(req.request_id, len(req.prompt_ids)), time.monotonic())
            )
        return decision

    def drop(self, request_id: str) -> bool:
        """Forget a queued request (cancel): its sequence and pages are released. True if it was queued."""
        for i, e in enumerate(self.queue):
            if e.req.request_id == request_id:
                del self.queue[i]
                self.release(request_id, e.seq_id)
                return True
        return False

    def release(self, request_id: str, seq_id: int) -> None:
        self.runtime.remove_sequence(seq_id)
        self.pool.release(request_id)

    def step(self) -> list[FirstToken]:
        """Schedule one forward of prompt slices, run it, and sample first tokens of completed prompts."""
        by_id = {e.req.request_id: e for e in self.queue}
        slices = schedule_prefill([e.item for e in self.queue], self.token_budget, self.max_seqs)
        if not slices:
            return []
        now = time.monotonic()
        for s in slices:
            e = by_id[s.request_id]
            if e.item.done == 0:
                e.t_start = now
                self.runtime.add_sequence(e.seq_id)
        entries = [by_id[s.request_id] for s in slices]
        hidden = self.runtime.forward_hidden(
            [e.seq_id for e in entries],
            [e.req.prompt_ids[s.begin : s.end] for e, s in zip(entries, slices, strict=True)],
        )  # hidden: [1, total tokens, h]
        done_rows, done_entries, offset = [], [], 0
        for e, s in zip(entries, slices, strict=True):
            offset += s.end - s.begin
            if completes_prompt(s, e.item):
                done_rows.append(offset - 1)
                done_entries.append(e)
            e.item.done = s.end
        if not done_entries:
            return []
        logits = self.runtime.logits_at(hidden, done_rows)  # [n_done, V]
        out = []
        t_done = time.monotonic()
        for e, row in zip(done_entries, logits, strict=True):
            ctx = self.runtime.config.context_window_size
            e.decoder = SequenceDecoder(e.req.params, self.tokenizer, len(e.req.prompt_ids), ctx)
            event = e.decoder.sample_and_append(row)
            out.append(FirstToken(e.req.request_id, e.req, e.seq_id, event, e.decoder, e.t_start - e.t_admit,
                                  t_done - e.t_start))  # fmt: skip
            self.queue.remove(e)
        return out
