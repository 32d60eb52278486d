"""Pure scheduling: the one admission policy every engine uses, which prompt slices run in the next prefill
forward, and the next decode batch (with evictions when pages run out).

No I/O, no runtime: functions of the worker state, unit-tested with small factories.

Eviction policy (documented for callers): when a running sequence needs a new page and none is free, the most
recently admitted running sequences are evicted, one at a time, until the rest fit; each evicted request ends with
an explicit EVICTED error (never silently dropped, never recomputed here). Reservations made up front (prompt + a
first slice of output) make this rare."""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

from engine.messages import ADMITTED, Admission, ErrorKind
from engine.pages import PagePool, pages_for


def admit(
    pool: PagePool,
    request_id: str,
    known: Container[str],
    *,
    tokens: int,
    active: int,
    max_active: int,
    what: str,
    peak_tokens: int | None = None,
    shared_pages: int = 0,
) -> Admission:
    """Admit a request that needs pages for `tokens` tokens now (and for `peak_tokens` at most, by its end), on
    an engine holding `active` of at most `max_active` requests (`what` names that limit in the reason).

    A duplicate id or a request that could never fit is INVALID (retrying cannot help); a full engine or pages
    that are taken right now is BUSY. `shared_pages` of the request's pages are a cached prefix it shares (already
    counted). Reserving the pages is the caller's next step."""
    if request_id in known:
        return Admission.refuse(ErrorKind.INVALID, f"request {request_id!r} is already on this worker")
    need = pages_for(tokens, pool.page_size) - shared_pages
    peak = pages_for(max(tokens, peak_tokens or 0), pool.page_size)
    if peak > pool.total:
        return Admission.refuse(
            ErrorKind.INVALID,
            f"request needs up to {peak} KV pages (prompt + max_tokens), the worker has {pool.total}",
        )
    if active >= max_active:
        return Admission.refuse(ErrorKind.BUSY, f"{what} full ({max_active} requests)")
    if not pool.can_reserve(need):
        return Admission.refuse(ErrorKind.BUSY, f"KV pages exhausted ({pool.free} free, {need} needed)")
    return ADMITTED


def decode_reservation(prompt_len: int, max_tokens: int, output_slice: int) -> int:
    """Tokens a decode-side admission reserves: the prompt plus a first slice of output."""
    return prompt_len + min(max_tokens, output_slice)


# ---- prefill --------------------------------------------------------------------------------------------------
@dataclass
class PrefillItem:
    """A queued request's prefill progress: `done` of `prompt_len` tokens are in the cache. While no other prompt
    waits, no slice crosses `split_at` (when set): the tokens after it get a small forward of their own (a streamed
    prompt's last piece). With others waiting the split is ignored: their tokens would fill that forward, and token 1
    would come a whole forward later."""

    request_id: str
    prompt_len: int
    done: int = 0
    split_at: int = 0

    @property
    def remaining(self) -> int:
        return self.prompt_len - self.done


@dataclass(frozen=True)
class PrefillSlice:
    """Append prompt tokens [begin, end) of `request_id` in this forward."""

    request_id: str
    begin: int
    end: int


def schedule_prefill(queue: Sequence[PrefillItem], token_budget: int, max_seqs: int) -> list[PrefillSlice]:
    """First come, first served: fill one forward with up to `token_budget` prompt tokens from at most `max_seqs`
    requests; a prompt that does not fit is split and continues in the next step."""
    slices: list[PrefillSlice] = []
    room = token_budget
    waiting = sum(item.remaining > 0 for item in queue)
    for item in queue:
        if room == 0 or len(slices) == max_seqs:
            break
        if item.remaining <= 0:
            continue
        take = min(room, item.remaining)
        if waiting == 1 and item.done < item.split_at < item.done + take:
            take = item.split_at - item.done
        slices.append(PrefillSlice(item.request_id, item.done, item.done + take))
        room -= take
    return slices


def completes_prompt(s: PrefillSlice, item: PrefillItem) -> bool:
    return s.end == item.prompt_len


# ---- decode ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeSeq:
    """A decoding sequence: `length` tokens in the cache (it needs room for `length + tokens` to take a step)."""

    request_id: str
    length: int
    shared_pages: int = 0  # leading pages shared with a cached prefix (not the sequence's to reserve)
    tokens: int = 1  # tokens this step appends (1 + its draft when it speculates)


@dataclass(frozen=True)
class DecodePlan:
    batch: tuple[str, ...]  # decode these, in this order
    grow: tuple[tuple[str, int], ...]  # (request, extra pages to reserve) before the step
    evict: tuple[str, ...]  # end these with EVICTED and free their pages


def schedule_decode(seqs: Sequence[DecodeSeq], pool: PagePool, max_batch: int) -> DecodePlan:
    """Every decoding sequence (in admission order, up to `max_batch`) appends its `tokens`. Pages beyond a
    sequence's reservation are taken from the free pool; if they run out, the latest-admitted sequences are
    evicted until the rest fit."""
    ready = list(seqs[:max_batch])
    need = {
        s.request_id: max(
            0, pages_for(s.length + s.tokens, pool.page_size) - s.shared_pages - pool.held_by(s.request_id)
        )
        for s in ready
    }
    free = pool.free
    evicted: list[str] = []
    while ready and sum(need[s.request_id] for s in ready) > free:
        victim = ready.pop()
        evicted.append(victim.request_id)
        free += pool.held_by(victim.request_id)
    grow = tuple((s.request_id, need[s.request_id]) for s in ready if need[s.request_id] > 0)
    return DecodePlan(tuple(s.request_id for s in ready), grow, tuple(evicted))
