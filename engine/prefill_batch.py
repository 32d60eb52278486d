"""`PrefillBatch`: the prefill half of an engine over one runtime (the prefill worker's, and the decode engine's
for prompts it prefills itself): a FIFO of admitted prompts, one forward per step, first tokens sampled on the spot.

Call order (engine thread only): the engine admits a request, reserves its pages and creates its sequence (fresh,
or forked from a cached prefix of `done` tokens) -> `add(req, seq_id, decoder, done)` -> `step()` until the request
comes back as a `FirstToken` (or a `PrefillFailure`) -> the engine keeps the sequence (decode here, or cache it) or
releases it. `drop(request_id)` takes a queued request out (cancel). The batch owns no pages and no sequences: the
engine made them and releases them; a failed forward's sequences are already gone from the runtime when their
`PrefillFailure`s come back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.messages import ChunkTiming, GenerationRequest
from engine.scheduler import PrefillItem, completes_prompt, schedule_prefill
from llama_relax.generation import SequenceDecoder, TokenEvent
from llama_relax.runtime import ModelRuntime


@dataclass
class PrefillEntry:
    req: GenerationRequest
    seq_id: int
    item: PrefillItem
    decoder: SequenceDecoder  # the request's sampling/stop state, made by the engine at admission
    t_admit: float
    t_start: float = 0.0
    chunks: list[ChunkTiming] = field(default_factory=list)  # its forwards so far (traces)


@dataclass(frozen=True)
class FirstToken:
    """A prompt finished prefilling; `event` is its first output token, `decoder` its sampling/stop state."""

    request_id: str
    req: GenerationRequest
    seq_id: int
    event: TokenEvent
    decoder: SequenceDecoder
    queue_s: float
    prefill_s: float
    chunks: tuple[ChunkTiming, ...] = ()


@dataclass(frozen=True)
class PrefillFailure:
    """The forward that held this request failed; its sequence was dropped from the runtime."""

    request_id: str
    seq_id: int
    message: str


class PrefillBatch:
    def __init__(self, runtime: ModelRuntime, max_seqs: int, token_budget: int = 0) -> None:
        self.runtime = runtime
        self.max_seqs = max_seqs  # sequences per forward
        self.token_budget = token_budget or runtime.prefill_chunk_size
        self.queue: list[PrefillEntry] = []

    @property
    def queued_tokens(self) -> int:
        return sum(e.item.remaining for e in self.queue)

    def add(
        self, req: GenerationRequest, seq_id: int, decoder: SequenceDecoder, done: int = 0, split_at: int = 0
    ) -> None:
        """Queue a request whose sequence already holds its first `done` tokens (a cached prefix); no forward
        crosses token `split_at` (0: none)."""
        item = PrefillItem(req.request_id, len(req.token_ids), done, split_at)
        self.queue.append(PrefillEntry(req, seq_id, item, decoder, time.monotonic()))

    def drop(self, request_id: str) -> PrefillEntry | None:
        """Take a queued request out; the caller releases its sequence and pages. None if it is not queued."""
        for i, e in enumerate(self.queue):
            if e.req.request_id == request_id:
                return self.queue.pop(i)
        return None

    def step(self) -> tuple[list[FirstToken], list[PrefillFailure]]:
        """schedule -> execute -> update for one forward of prompt slices. Returns the prompts that completed and
        those whose forward failed."""
        slices = schedule_prefill([e.item for e in self.queue], self.token_budget, self.max_seqs)
        if not slices:
            return [], []
        by_id = {e.req.request_id: e for e in self.queue}
        entries = [by_id[s.request_id] for s in slices]
        now, start_ns = time.monotonic(), time.time_ns()
        try:
            for e in entries:
                e.t_start = e.t_start or now
            hidden = self.runtime.forward_hidden(
                [e.seq_id for e in entries],
                [e.req.token_ids[s.begin : s.end] for e, s in zip(entries, slices, strict=True)],
            )  # hidden: [1, total tokens, h]
            done_rows, done, offset = [], [], 0
            for e, s in zip(entries, slices, strict=True):
                offset += s.end - s.begin
                if completes_prompt(s, e.item):
                    done_rows.append(offset - 1)
                    done.append(e)
                e.item.done = s.end
            logits = self.runtime.logits_at(hidden, done_rows) if done else []  # [n_done, V]
        except Exception as e:  # this forward's sequences are undefined: they fail alone, the engine goes on
            for entry in entries:
                self.queue.remove(entry)
                self.runtime.remove_sequence(entry.seq_id)
            msg = f"prefill failed: {type(e).__name__}: {e}"
            return [], [PrefillFailure(x.req.request_id, x.seq_id, msg) for x in entries]
        out = []
        t_done, end_ns = time.monotonic(), time.time_ns()
        for e, s in zip(entries, slices, strict=True):
            e.chunks.append(ChunkTiming(start_ns, end_ns, s.begin, s.end))
        for e, row in zip(done, logits, strict=True):
            event = e.decoder.sample_and_append(row)
            queue_s, prefill_s = e.t_start - e.t_admit, t_done - e.t_start
            out.append(
                FirstToken(e.req.request_id, e.req, e.seq_id, event, e.decoder, queue_s, prefill_s, tuple(e.chunks))
            )
            self.queue.remove(e)
        return out, []
