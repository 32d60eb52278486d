"""Pure scheduling decisions of the workers (no TVM): admission, prefill packing, decode batches and eviction,
driven by small factories; every scenario ends with a leak check (all pages back in the pool)."""

from __future__ import annotations

from decode_worker.scheduler import DecodeSeq, admit_decode, schedule_decode
from prefill_worker.pages import PagePool, pages_for
from prefill_worker.scheduler import PrefillItem, admit_prefill, schedule_prefill


def items(*lengths: int) -> list[PrefillItem]:
    return [PrefillItem(f"r{i}", n) for i, n in enumerate(lengths)]


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


def test_prefill_respects_max_seqs_and_empty_queue():
    assert len(schedule_prefill(items(1, 1, 1, 1), 100, max_seqs=2)) == 2
    assert schedule_prefill([], 100, 4) == []


def test_admission_refuses_full_queue_and_missing_pages():
    pool = PagePool(total=10)
    assert admit_prefill(3, 3, pool, 5).ok is False
    assert "queue full" in admit_prefill(3, 3, pool, 5).reason
    assert admit_prefill(0, 3, pool, 16 * 10).ok
    assert "has 10" in admit_prefill(0, 3, pool, 16 * 11).reason
    pool.reserve("x", 9)
    assert "exhausted" in admit_prefill(0, 3, pool, 17).reason
    pool.release("x")
    assert pool.free == pool.total


def test_decode_admission_reserves_prompt_plus_slice():
    pool = PagePool(total=8)
    decision, pages = admit_decode(pool, 0, 4, prompt_len=20, max_tokens=100, output_slice=12)
    assert decision.ok and pages == pages_for(32)
    decision, pages = admit_decode(pool, 4, 4, prompt_len=1, max_tokens=1, output_slice=1)
    assert not decision.ok and "batch full" in decision.reason


def test_decode_batch_grows_and_evicts_latest_when_pages_run_out():
    pool = PagePool(total=5)
    seqs = [DecodeSeq("a", 16, True), DecodeSeq("b", 16, True), DecodeSeq("c", 5, False)]
    for s in seqs:
        assert pool.ensure(s.request_id, s.length)
    plan = schedule_decode(seqs, pool, max_batch=8)
    assert plan.batch == ("a", "b") and plan.evict == () and dict(plan.grow) == {"a": 1, "b": 1}
    for rid, n in plan.grow:
        pool.reserve(rid, n)
    seqs[0].length = seqs[1].length = 32  # both need a third page; 0 free -> evict the later one
    plan = schedule_decode(seqs, pool, max_batch=8)
    assert plan.evict == ("b",) and plan.batch == ("a",) and dict(plan.grow) == {"a": 1}
    pool.release("b")
    for rid, n in plan.grow:
        assert pool.reserve(rid, n)
    for rid in ("a", "c"):
        pool.release(rid)
    assert pool.free == pool.total and not pool.held


def test_decode_batch_limit_and_not_ready_sequences_wait():
    pool = PagePool(total=100)
    seqs = [DecodeSeq(f"s{i}", 3, ready=i != 1) for i in range(6)]
    plan = schedule_decode(seqs, pool, max_batch=3)
    assert plan.batch == ("s0", "s2", "s3")
