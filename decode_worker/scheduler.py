"""Pure decode scheduling: reservations, the next decode batch, and evictions when pages run out.

Eviction policy (documented for callers): when a running sequence needs a new page and none is free, the most
recently admitted running sequences are evicted, one at a time, until the rest fit; each evicted request ends with
an explicit EVICTED error (never silently dropped, never recomputed here). Reservations made up front
(prompt + a first slice of output) make this rare."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefill_worker.pages import PagePool, pages_for
from prefill_worker.scheduler import Admission


@dataclass
class DecodeSeq:
    """A sequence on the decode worker: `length` tokens in the cache; `ready` once its KV and first token are in."""

    request_id: str
    length: int
    ready: bool = False


@dataclass(frozen=True)
class DecodePlan:
    batch: tuple[str, ...]  # decode these, in this order
    grow: tuple[tuple[str, int], ...]  # (request, extra pages to reserve) before the step
    evict: tuple[str, ...]  # end these with EVICTED and free their pages


def admit_decode(
    pool: PagePool, num_seqs: int, max_seqs: int, prompt_len: int, max_tokens: int, output_slice: int
) -> tuple[Admission, int]:
    """Reserve for the prompt plus a first slice of output. Returns the decision and the pages to reserve."""
    if num_seqs >= max_seqs:
        return Admission(False, f"decode batch full ({max_seqs} sequences)"), 0
    need = pages_for(prompt_len + min(max_tokens, output_slice), pool.page_size)
    if not pool.can_reserve(need):
        return Admission(False, f"KV pages exhausted ({pool.free} free, {need} needed)"), 0
    return Admission(True), need


def schedule_decode(seqs: Sequence[DecodeSeq], pool: PagePool, max_batch: int) -> DecodePlan:
    """Every ready sequence (in admission order, up to `max_batch`) decodes one token; each needs room for
    `length + 1` tokens. Pages beyond a sequence's reservation are taken from the free pool; if they run out,
    the latest-admitted running sequences are evicted until the rest fit."""
    ready = [s for s in seqs if s.ready][:max_batch]
    need = {s.request_id: max(0, pages_for(s.length + 1, pool.page_size) - pool.held.get(s.request_id, 0))
            for s in ready}  # fmt: skip
    free = pool.free
    evicted: list[str] = []
    while ready and sum(need[s.request_id] for s in ready) > free:
        victim = ready.pop()
        evicted.append(victim.request_id)
        free += pool.held.get(victim.request_id, 0)
    grow = tuple((s.request_id, need[s.request_id]) for s in ready if need[s.request_id] > 0)
    return DecodePlan(tuple(s.request_id for s in ready), grow, tuple(evicted))
