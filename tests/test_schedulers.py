"""Pure scheduling decisions of the engines (no TVM): the shared admission policy, prefill packing, decode
batches and eviction, driven by small factories; every scenario ends with a leak check (all pages back)."""

from __future__ import annotations

from engine.messages import ErrorKind
from engine.pages import PagePool, pages_for
from engine.scheduler import DecodeSeq, PrefillItem, admit, decode_reservation, schedule_decode, schedule_prefill


def items(*lengths: int) -> list[PrefillItem]:
    return [PrefillItem(f"r{i}", n) for i, n in enumerate(lengths)]


def assert_no_leaks(pool: PagePool) -> None:
    assert pool.free == pool.total and not pool.held


def test_pages_for():
    assert [pages_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_prefill_packs_fcfs_and_splits_long_prompts():
    queue = items(10, 100, 5)
    plan = schedule_prefill(queue, token_budget=64, max_seqs=8)
    assert [(s.request_id, s.begin, s.end) for s in plan] == [("r0", 0, 10), ("r1", 0, 54)]
    for s in plan:
        next(i for i in queue if i.request_id == s.request_id).done = s.end
    queue = [i for i in queue if i.remaining > 0]
    plan = schedule_prefill(queue, token_budget=64, max_seqs=8)
    assert [(s.request_id, s.begin, s.end) for s in plan] == [("r1", 54, 100), ("r2", 0, 5)]


def test_a_streamed_prompt_alone_gets_its_tail_in_a_forward_of_its_own_but_not_when_others_wait():
    alone = [PrefillItem("s", 100, split_at=80)]
    plan = schedule_prefill(alone, token_budget=512, max_seqs=8)
    assert [(s.begin, s.end) for s in plan] == [(0, 80)]
    alone[0].done = 80
    assert [(s.begin, s.end) for s in schedule_prefill(alone, 512, 8)] == [(80, 100)]
    busy = [PrefillItem("s", 100, split_at=80), PrefillItem("o", 30)]  # the split would delay token 1 a forward
    assert [(s.request_id, s.begin, s.end) for s in schedule_prefill(busy, 512, 8)] == [("s", 0, 100), ("o", 0, 30)]


def test_prefill_respects_max_seqs_and_empty_queue():
    assert len(schedule_prefill(items(1, 1, 1, 1), 100, max_seqs=2)) == 2
    assert schedule_prefill([], 100, 4) == []


def test_admission_kinds():
    pool = PagePool(total=10)
    ok = admit(pool, "a", set(), tokens=16 * 10, active=0, max_active=3, what="queue")
    assert ok.ok and ok.kind is None
    full = admit(pool, "a", set(), tokens=5, active=3, max_active=3, what="prefill queue")
    assert full.kind is ErrorKind.BUSY and "prefill queue full" in full.reason
    never = admit(pool, "a", set(), tokens=16 * 11, active=0, max_active=3, what="queue")
    assert never.kind is ErrorKind.INVALID and "has 10" in never.reason
    dup = admit(pool, "a", {"a"}, tokens=5, active=0, max_active=3, what="queue")
    peak = admit(pool, "c", set(), tokens=16, peak_tokens=16 * 11, active=0, max_active=3, what="queue")
    assert peak.kind is ErrorKind.INVALID and "prompt + max_tokens" in peak.reason
    assert dup.kind is ErrorKind.INVALID and "already" in dup.reason
    pool.reserve("x", 9)
    taken = admit(pool, "b", {"x"}, tokens=17, active=1, max_active=3, what="queue")
    assert taken.kind is ErrorKind.BUSY and "exhausted" in taken.reason
    assert taken.error("b").kind is ErrorKind.BUSY
    pool.release("x")
    assert_no_leaks(pool)


def test_decode_admission_reserves_prompt_plus_slice():
    assert decode_reservation(20, max_tokens=100, output_slice=12) == 32
    assert decode_reservation(20, max_tokens=3, output_slice=12) == 23


def test_decode_batch_grows_and_evicts_latest_when_pages_run_out():
    pool = PagePool(total=5)
    seqs = [DecodeSeq("a", 16), DecodeSeq("b", 16)]
    for s in seqs:
        assert pool.reserve(s.request_id, pages_for(s.length))
    assert pool.reserve("c", 1)  # reserved, not decoding
    plan = schedule_decode(seqs, pool, max_batch=8)
    assert plan.batch == ("a", "b") and plan.evict == () and dict(plan.grow) == {"a": 1, "b": 1}
    for rid, n in plan.grow:
        pool.reserve(rid, n)
    seqs = [DecodeSeq("a", 32), DecodeSeq("b", 32)]  # both need a third page; 0 free -> evict the later one
    plan = schedule_decode(seqs, pool, max_batch=8)
    assert plan.evict == ("b",) and plan.batch == ("a",) and dict(plan.grow) == {"a": 1}
    pool.release("b")
    for rid, n in plan.grow:
        assert pool.reserve(rid, n)
    for rid in ("a", "c"):
        pool.release(rid)
    assert_no_leaks(pool)


def test_decode_batch_limit():
    pool = PagePool(total=100)
    seqs = [DecodeSeq(f"s{i}", 3) for i in range(6)]
    plan = schedule_decode(seqs, pool, max_batch=3)
    assert plan.batch == ("s0", "s1", "s2")
    assert_no_leaks(pool)
