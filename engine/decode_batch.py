"""`DecodeBatch`: the decode half of an engine over one runtime: one forward per step over the running
sequences, per-request sampling and stop checks, streaming. A step is one `batch_decode` (a token each), or, when
speculation is on and some sequence has a draft (`engine.speculation`; under `auto`, one that pays for itself by
the measured step cost), one verify forward over every running sequence (a sequence without a draft rides along
with its one token) that accepts several tokens per sequence, the LM head running only on the rows it reads.

Call order (engine thread only): the engine passes its DECODING sequences (admission order) to `step(running)`
each iteration -> the batch grows their page reservations, decodes one token each and streams it to the
sequence's `OutputStream` -> it returns the sequences that ended in this step (finished, evicted or failed), and the
engine releases them (its one release path). The batch frees only what eviction must free before the forward: an
evicted sequence's reservation and its sequence in the runtime, so the pages it held are there for the others.

On a pipelined runtime (`pipeline_depth` S > 1: stages in processes of their own) without speculation, a step
keeps up to S groups of sequences in flight (vLLM's virtual engines): it submits the running sequences that are not
in flight as one group (about 1/S of the batch) and lands the oldest group (samples, streams, ends) once S are in
flight, so the stages work on different groups at once. A sequence the engine ends while in flight (cancelled,
failed) is skipped when its group lands; the runtime waits for its forward before removing it."""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.loop import OutputStream
from engine.messages import ErrorKind, GenerationRequest, RequestError
from engine.pages import PagePool
from engine.prefix_cache import MISS, Hit
from engine.scheduler import DecodePlan, DecodeSeq, schedule_decode
from engine.speculation import Acceptance, NgramDrafter, SpecMode, SuffixIndex, choose_drafts, first_rows, verify_rounds
from llama_relax.generation import SequenceDecoder
from llama_relax.runtime import ModelRuntime
from llama_relax.spec_cost import StepCost


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
    drafter: NgramDrafter | None = None  # its prompt-lookup index (made at admission when speculation is on)
    acceptance: Acceptance = field(default_factory=Acceptance)  # its running draft acceptance (`auto`)

    @property
    def request_id(self) -> str:
        return self.req.request_id


@dataclass(frozen=True)
class InFlight:
    """A group submitted to a pipelined runtime (`decode_submit`), landed by a later step."""

    batch: list[DecodeSequence]
    flight: object  # the runtime's handle for `decode_collect`


@dataclass(frozen=True)
class Ended:
    """A sequence that left the batch this step: `error` is None when it finished normally."""

    seq: DecodeSequence
    error: RequestError | None


class DecodeBatch:
    def __init__(
        self,
        runtime: ModelRuntime,
        pool: PagePool,
        max_batch: int,
        spec: SpecMode = SpecMode.OFF,
        max_draft: int = 8,
        cost: StepCost | None = None,
    ) -> None:
        if spec is SpecMode.AUTO and cost is None:
            raise ValueError("--speculative auto needs the measured step cost (llama_relax.spec_cost)")
        self.runtime = runtime
        self.pool = pool
        self.max_batch = max_batch
        self.spec = spec
        self.max_draft = max_draft  # draft tokens per sequence and step, at most
        self.cost = cost
        self.index = SuffixIndex() if spec.uses_index else None  # recent outputs of this engine
        self.batch_sizes: Counter[int] = Counter()  # decode batch size -> steps (observability, tests)
        self.draft_tokens = 0  # counters read by load(): draft tokens verified, and those accepted
        self.accepted_tokens = 0
        self.depth = runtime.pipeline_depth if spec is SpecMode.OFF else 1  # groups in flight at once
        self.flights: deque[InFlight] = deque()  # submitted, oldest first (pipelined runtimes only)

    def step(self, running: Sequence[DecodeSequence]) -> tuple[bool, list[Ended]]:
        """schedule -> execute -> update for each running sequence (up to `max_batch`): one token, or a verified
        draft. Returns (did work, the sequences that ended)."""
        if self.depth > 1:
            return self._pipelined(running)
        drafts = self._drafts(running[: self.max_batch]) if self.spec is not SpecMode.OFF else {}
        plan = self._plan(running, drafts, self.max_batch)
        if plan.evict and drafts:  # pages are short: speculate another time rather than evict for it
            drafts = {}
            plan = self._plan(running, drafts, self.max_batch)
        batch, ended = self._take(running, plan)
        if not batch:
            return bool(ended), ended
        if any(drafts.get(s.request_id) for s in batch):
            return True, ended + self._verify(batch, drafts)
        try:
            logits = self.runtime.decode([s.seq_id for s in batch], [s.last_token for s in batch])  # [b, V]
        except Exception as e:  # the forward failed: the runtime dropped these sequences; they fail alone
            return True, ended + _failed(batch, f"decode failed: {type(e).__name__}: {e}")
        return True, ended + self._sampled(batch, logits)

    def _pipelined(self, running: Sequence[DecodeSequence]) -> tuple[bool, list[Ended]]:
        """One step with groups in flight (see the module docstring): submit the free sequences, land the oldest
        group when `depth` are in flight or nothing else was submitted."""
        flying = {s.request_id for f in self.flights for s in f.batch}
        free = [s for s in running if s.request_id not in flying]
        group = -(-min(len(running), self.max_batch) // self.depth)  # ceil(batch / depth)
        plan = self._plan(free, {}, max(0, min(group, self.max_batch - len(flying))))
        batch, ended = self._take(free, plan)
        if batch:
            try:
                flight = self.runtime.decode_submit([s.seq_id for s in batch], [s.last_token for s in batch])
            except Exception as e:  # refused before it started: the runtime dropped nothing; they fail alone
                ended += _failed(batch, f"decode failed: {type(e).__name__}: {e}")
            else:
                self.flights.append(InFlight(batch, flight))
        landed = bool(self.flights) and (len(self.flights) >= self.depth or not batch)
        if landed:
            f = self.flights.popleft()
            live = [s for s in f.batch if s.state is DecodeState.DECODING]  # not ended while in flight
            try:
                logits = self.runtime.decode_collect(f.flight)  # [b, V]
            except Exception as e:  # the runtime dropped these sequences; they fail alone
                ended += _failed(live, f"decode failed: {type(e).__name__}: {e}")
            else:
                rows = {s.request_id: row for s, row in zip(f.batch, logits, strict=True)}
                ended += self._sampled(live, [rows[s.request_id] for s in live])
        return bool(batch or ended or landed), ended

    def _take(self, seqs: Sequence[DecodeSequence], plan: DecodePlan) -> tuple[list[DecodeSequence], list[Ended]]:
        """Carry out `plan`'s evictions and page growth; the sequences of its batch, and the evicted."""
        by_id = {s.request_id: s for s in seqs}
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
        return [by_id[rid] for rid in plan.batch], ended

    def _sampled(self, batch: Sequence[DecodeSequence], logits: Sequence[np.ndarray]) -> list[Ended]:
        """Each sequence's token from its logits row: appended, streamed, stop-checked; those that finished."""
        self.batch_sizes[len(batch)] += 1
        ended = []
        for s, row in zip(batch, logits, strict=True):
            s.length += 1
            event = s.decoder.sample_and_append(row)
            s.last_token = event.token_id
            s.out.put(event)
            if event.finish_reason is not None:
                ended.append(self._finished(s))
        return ended

    def _finished(self, s: DecodeSequence) -> Ended:
        if self.index is not None:
            self.index.add(s.decoder.output_ids)
        return Ended(s, None)

    def start(self, s: DecodeSequence) -> None:
        """At admission, with speculation on: index the prompt while its KV is computed or arrives, so the first
        decode step can already verify a draft."""
        if self.spec is not SpecMode.OFF:
            s.drafter = NgramDrafter()
            s.drafter.extend(s.req.prompt_ids)

    def _plan(self, running: Sequence[DecodeSequence], drafts: dict[str, list[int]], limit: int) -> DecodePlan:
        seqs = [
            DecodeSeq(s.request_id, s.length, s.hit.shared_pages, 1 + len(drafts.get(s.request_id, ())))
            for s in running
        ]
        return schedule_decode(seqs, self.pool, limit)

    def _drafts(self, running: Sequence[DecodeSequence]) -> dict[str, list[int]]:
        """Each sequence's draft for this step: at most `max_draft` tokens, fewer where its `max_tokens`, the
        context window or the forward's token budget (the prefill chunk) would be passed; under `auto`, only the
        tokens whose expected gain pays for the verify step (`choose_drafts`)."""
        budget = self.runtime.prefill_chunk_size - len(running)  # every sequence feeds its last token
        ctx = self.runtime.config.context_window_size
        out: dict[str, list[int]] = {}
        for s in running:
            d = s.decoder
            room = min(self.max_draft, d.params.max_tokens - len(d.output_ids) - 1, ctx - s.length - 2, budget)
            if room <= 0:
                continue
            if s.drafter is None:
                self.start(s)
            s.drafter.sync(s.req.prompt_ids, d.output_ids)
            draft = s.drafter.propose(room)
            if not draft and self.index is not None:
                draft = self.index.propose(s.drafter.tokens, room)
            if draft:
                out[s.request_id] = draft
                budget -= len(draft)
        if self.spec is SpecMode.AUTO and out:
            assert self.cost is not None
            seqs = list(running)
            keep = choose_drafts(
                self.cost, [out.get(s.request_id, []) for s in seqs], [s.acceptance.rate for s in seqs]
            )
            out = {s.request_id: out[s.request_id][:n] for s, n in zip(seqs, keep, strict=True) if n}
        return out

    def _verify(self, batch: list[DecodeSequence], drafts: dict[str, list[int]]) -> list[Ended]:
        """One forward appends every sequence's inputs (no draft: its one token); `verify_rounds` then computes
        the logits rows acceptance may need (two LM-head calls at most) and streams each token; each sequence pops
        its rejected inputs."""
        inputs = [[s.last_token, *drafts.get(s.request_id, ())] for s in batch]
        starts = [0]
        for fed in inputs[:-1]:
            starts.append(starts[-1] + len(fed))
        try:
            hidden = self.runtime.forward_hidden([s.seq_id for s in batch], inputs)  # [1, sum(len(fed)), h]
            verified = verify_rounds(
                [s.decoder for s in batch],
                [fed[1:] for fed in inputs],
                lambda pairs: self.runtime.logits_at(hidden, [starts[i] + j for i, j in pairs]),
                lambda i, event: batch[i].out.put(event),
                first=[first_rows(s.acceptance.rate, len(fed) - 1) for s, fed in zip(batch, inputs, strict=True)],
            )
        except Exception as e:  # the forward failed: these sequences fail alone (their release removes them)
            return _failed(batch, f"verify failed: {type(e).__name__}: {e}")
        self.batch_sizes[len(batch)] += 1
        ended = []
        for s, fed, v in zip(batch, inputs, verified, strict=True):
            if len(fed) > v.kept:  # the rejected draft tokens leave the cache
                self.runtime.popn(s.seq_id, len(fed) - v.kept)
            s.length += v.kept
            s.last_token = v.events[-1].token_id
            self.draft_tokens += len(fed) - 1
            self.accepted_tokens += v.accepted
            finished = v.events[-1].finish_reason is not None
            if len(fed) > 1:
                s.acceptance.update(len(fed) - 1, v.accepted, finished)
            if finished:
                ended.append(self._finished(s))
        return ended


def _failed(batch: Sequence[DecodeSequence], message: str) -> list[Ended]:
    return [Ended(s, RequestError(s.request_id, ErrorKind.INTERNAL, message)) for s in batch]
