"""The planner (#29) as a pure function of its signals, driven tick by tick with factories: it grows a pool the
tick its SLO is predicted to break, shrinks it only after it idled `down_ticks` ticks, moves one worker per tick
within MIN:MAX, holds while a step is under way, and switches a worker's role when a pool cannot grow. Bad bounds
and SLOs are one-line errors naming the flag."""

from __future__ import annotations

import pytest

from engine.messages import Role
from router.planner import (
    DecodeSignals,
    Direction,
    Planner,
    PoolRange,
    PrefillSignals,
    Reason,
    Slo,
)

SLO = Slo(ttft_s=1.0, itl_s=0.1)


def prefill(workers=1, queued=0, rate=1000.0, **kw) -> PrefillSignals:
    return PrefillSignals(workers, queued, rate, **kw)


def decode(workers=1, running=0, slots=8, kv=0.0, itl=0.02, **kw) -> DecodeSignals:
    return DecodeSignals(workers, running, slots, kv, itl, **kw)


def planner(p=(1, 3), d=(1, 3), **kw) -> Planner:
    return Planner({Role.PREFILL: PoolRange(*p), Role.DECODE: PoolRange(*d)}, SLO, **kw)


def moves(decisions):
    return [(d.role, d.direction, d.reason, d.workers) for d in decisions]


def test_a_long_prefill_queue_grows_the_prefill_pool_at_once():
    pl = planner()
    assert pl.tick(prefill(queued=500), decode()) == []  # 0.5 s predicted: within 1 s
    assert moves(pl.tick(prefill(queued=1500), decode())) == [(Role.PREFILL, Direction.UP, Reason.TTFT, 2)]
    assert pl.tick(prefill(2, queued=1500, busy=True), decode()) == []  # the worker is starting: hold
    assert moves(pl.tick(prefill(2, queued=2500), decode())) == [(Role.PREFILL, Direction.UP, Reason.TTFT, 3)]
    assert pl.tick(prefill(3, queued=9000), decode()) == []  # at MAX, and decode cannot give a worker (at MIN)


def test_decode_grows_on_itl_slots_or_kv_and_shrinks_only_after_idling():
    pl = planner()
    assert moves(pl.tick(prefill(), decode(itl=0.3))) == [(Role.DECODE, Direction.UP, Reason.ITL, 2)]
    assert moves(pl.tick(prefill(), decode(2, running=15))) == [(Role.DECODE, Direction.UP, Reason.SLOTS, 3)]
    pl = planner()
    assert moves(pl.tick(prefill(), decode(2, kv=0.95, itl=None))) == [(Role.DECODE, Direction.UP, Reason.KV, 3)]
    idle = decode(3, running=2, kv=0.1, itl=0.01)
    assert pl.tick(prefill(), idle) == []  # the first idle tick: not yet
    assert moves(pl.tick(prefill(), idle)) == [(Role.DECODE, Direction.DOWN, Reason.IDLE, 2)]
    assert pl.tick(prefill(), decode(2, running=2, itl=0.01)) == []  # the count starts again after a step
    assert pl.tick(prefill(), decode(2, running=7, itl=0.01)) == []  # 7 would not fit one worker at 60 %
    assert pl.tick(prefill(), decode(2, running=2, itl=0.07)) == []  # ITL above half the target: keep
    pl.tick(prefill(), decode(1, itl=None))
    assert pl.tick(prefill(), decode(1, itl=None)) == []  # never below MIN


def test_an_interrupted_idle_spell_does_not_shrink():
    pl = planner()
    idle, busy = decode(2, running=1), decode(2, running=9)
    assert pl.tick(prefill(), idle) == []
    assert pl.tick(prefill(), busy) == []
    assert pl.tick(prefill(), idle) == []  # one idle tick again, not two in a row
    assert moves(pl.tick(prefill(), idle)) == [(Role.DECODE, Direction.DOWN, Reason.IDLE, 1)]


def test_bounds_win_and_unmeasured_prefill_holds():
    pl = planner(p=(2, 3))
    assert moves(pl.tick(prefill(1, rate=0.0), decode())) == [(Role.PREFILL, Direction.UP, Reason.BELOW_MIN, 2)]
    assert moves(pl.tick(prefill(4), decode())) == [(Role.PREFILL, Direction.DOWN, Reason.ABOVE_MAX, 3)]
    assert pl.tick(prefill(2, queued=10**6, rate=0.0), decode()) == []  # no rate measured yet: no basis


def test_a_pool_that_cannot_grow_takes_a_worker_of_the_other():
    pl = planner(p=(1, 2), d=(1, 2))
    [d] = pl.tick(prefill(2, queued=0), decode(2, itl=0.5))  # decode at MAX, prefill idle above its MIN
    assert (d.role, d.direction, d.source, d.reason, d.workers) == (
        Role.DECODE,
        Direction.SWITCH,
        Role.PREFILL,
        Reason.NO_NODE,
        3,
    )
    assert "switch a prefill worker to decode" in str(d)
    [d] = planner().tick(prefill(2, queued=5000, stuck=True), decode(2))  # no node came for prefill
    assert (d.role, d.direction, d.source) == (Role.PREFILL, Direction.SWITCH, Role.DECODE)
    assert planner().tick(prefill(2, queued=5000, stuck=True), decode(1)) == []  # decode at its MIN gives none
    busy = planner().tick(prefill(2, queued=5000, stuck=True), decode(2, itl=0.5))
    assert [x.direction for x in busy] == [Direction.UP]  # both want to grow: decode grows, prefill waits


def test_only_ranged_pools_are_planned():
    pl = Planner({Role.DECODE: PoolRange(1, 2)}, SLO)
    assert moves(pl.tick(prefill(1, queued=10**6), decode(1, itl=0.5))) == [(Role.DECODE, Direction.UP, Reason.ITL, 2)]


@pytest.mark.parametrize(
    ("text", "least", "error"),
    [
        ("3:1", 1, "MIN 3 > MAX 1"),
        ("0:2", 1, "must allow at least 1 worker, got MIN 0"),
        ("a:b", 1, "expected N or MIN:MAX"),
        ("1:", 1, "expected N or MIN:MAX"),
    ],
)
def test_bad_ranges_name_the_flag(text, least, error):
    with pytest.raises(ValueError) as e:
        PoolRange.parse(text, "--decode-workers", least)
    assert str(e.value).startswith("--decode-workers: ") and error in str(e.value) and "\n" not in str(e.value)


def test_ranges_and_slos_parse():
    assert PoolRange.parse("2", "--x", 1) == PoolRange(2, 2) and PoolRange(2, 2).fixed
    assert PoolRange.parse(" 1 : 4 ", "--x", 1) == PoolRange(1, 4)
    assert Slo.parse("ttft=500,itl=50") == Slo(0.5, 0.05)
    for bad in ("ttft=500", "ttft=5,itl=x", "ttft=0,itl=5", "latency=5,itl=5", "ttft=1,ttft=2,itl=3"):
        with pytest.raises(ValueError, match=r"^--slo: "):
            Slo.parse(bad)


def test_a_pool_waiting_for_a_node_holds_the_others_shrink_then_takes_its_worker():
    pl = planner(p=(1, 2), d=(1, 2))
    waiting = decode(1, running=9, busy=True, growing=True)  # its new worker is not up yet
    for _ in range(3):
        assert pl.tick(prefill(2), waiting) == []  # prefill idles, but its worker may be needed: no shrink
    [d] = pl.tick(prefill(2), decode(1, running=9, busy=True, growing=True, stuck=True))  # no node came
    assert (d.role, d.direction, d.source, d.workers) == (Role.DECODE, Direction.SWITCH, Role.PREFILL, 2)
    assert "found no node" in str(d)
    assert pl.tick(prefill(2, busy=True, growing=True), decode(1)) == []  # nothing is taken from a growing pool
