"""Pure prefill scheduling: what to admit, and which prompt slices to run in the next forward.

No I/O, no runtime: functions of the worker state, unit-tested with small factories."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefill_worker.pages import PagePool, pages_for


@dataclass
class PrefillItem:
    """A queued request's prefill progress: `done` of `prompt_len` tokens are in the cache."""

    request_id: str
    prompt_len: int
    done: int = 0

    @property
    def remaining(self) -> int:
        return self.prompt_len - self.done


@dataclass(frozen=True)
class PrefillSlice:
    """Append prompt tokens [begin, end) of `request_id` in this forward."""

    request_id: str
    begin: int
    end: int


@dataclass(frozen=True)
class Admission:
    ok: bool
    reason: str = ""


def admit_prefill(queue_len: int, max_queue: int, pool: PagePool, prompt_len: int) -> Admission:
    """Admit a request if the queue has room and its whole prompt's pages can be reserved now."""
    if queue_len >= max_queue:
        return Admission(False, f"prefill queue full ({max_queue} requests)")
    need = pages_for(prompt_len, pool.page_size)
    if need > pool.total:
        return Admission(False, f"prompt needs {need} KV pages, the worker has {pool.total}")
    if not pool.can_reserve(need):
        return Admission(False, f"KV pages exhausted ({pool.free} free, {need} needed)")
    return Admission(True)


def schedule_prefill(queue: Sequence[PrefillItem], token_budget: int, max_seqs: int) -> list[PrefillSlice]:
    """First come, first served: fill one forward with up to `token_budget` prompt tokens from at most
    `max_seqs` requests; a prompt that does not fit is split and continues in the next step."""
    slices: list[PrefillSlice] = []
    room = token_budget
    for item in queue:
        if room == 0 or len(slices) == max_seqs:
            break
        if item.remaining <= 0:
            continue
        take = min(room, item.remaining)
        slices.append(PrefillSlice(item.request_id, item.done, item.done + take))
        room -= take
    return slices


def completes_prompt(s: PrefillSlice, item: PrefillItem) -> bool:
    return s.end == item.prompt_len
