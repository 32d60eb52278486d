"""The router's request flow and placement against fake workers that implement the typed worker protocols
(no Ray, no model): retries, refusals, failures as explicit outcomes, cancels, and the pools' refresh."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from engine.loop import Output
from engine.messages import (
    ADMITTED,
    Admission,
    ErrorKind,
    GenerationRequest,
    PrefillResult,
    RequestError,
    Role,
    WorkerInfo,
    WorkerLoad,
)
from engine.protocols import WorkerFault, WorkerGone
from llama_relax.generation import FinishReason, TokenEvent
from llama_relax.sampling import SamplingParams
from router.pools import Pools, WorkerSlot, decode_order, pick_prefill
from router.router import Done, RequestState, Router, RouterError, ServeMode

REQ = GenerationRequest("r1", (1, 2, 3), SamplingParams(max_tokens=3, temperature=0))


def tok(t: int, last: bool = False) -> TokenEvent:
    return TokenEvent(t, f"<{t}>", (), FinishReason.LENGTH if last else None)


@dataclass
class FakeWorker:
    """The calls every role answers; records cancels."""

    role: Role
    incarnation: str = "inc-1"
    kv_address: str = ""
    free_pages: int = 10
    fail_load: bool = False
    cancelled: list[str] = field(default_factory=list)

    def describe(self) -> WorkerInfo:
        return WorkerInfo(self.role, self.incarnation, 1, self.kv_address)

    def load(self) -> WorkerLoad:
        if self.fail_load:
            raise WorkerGone("not answering")
        return WorkerLoad(self.incarnation, free_pages=self.free_pages, total_pages=10, queued_tokens=7)

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    def ping(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass
class FakePrefill(FakeWorker):
    role: Role = Role.PREFILL
    behaviour: str = "ok"  # ok | dies | busy | dies_after_token | finishes | fault
    targets: list[str] = field(default_factory=list)

    def prefill_stream(self, req: GenerationRequest, kv_target: str) -> Iterator[TokenEvent | PrefillResult]:
        self.targets.append(kv_target)
        rid = req.request_id
        if self.behaviour == "dies":
            raise WorkerGone("actor died")
        if self.behaviour == "fault":
            raise WorkerFault("ValueError: bad thing")
        if self.behaviour == "busy":
            yield PrefillResult(rid, None, RequestError(rid, ErrorKind.BUSY, "prefill queue full"))
            return
        first = tok(10, last=self.behaviour == "finishes")
        yield first
        if self.behaviour == "dies_after_token":
            raise WorkerGone("actor died")
        yield PrefillResult(rid, first, None, 0.01, 0.02, 0.003, 4096)


@dataclass
class FakeDecode(FakeWorker):
    role: Role = Role.DECODE
    kv_address: str = "127.0.0.1:7000"
    admission: Admission = ADMITTED
    events: list[Output] = field(default_factory=lambda: [tok(11), tok(12, last=True)])
    reserved: list[str] = field(default_factory=list)
    dead: bool = False

    def reserve(self, req: GenerationRequest) -> Admission:
        if self.dead:
            raise WorkerGone("actor died")
        self.reserved.append(req.request_id)
        return self.admission

    def stream(self, request_id: str) -> Iterator[Output]:
        for e in self.events:
            if isinstance(e, Exception):
                raise e
            yield e


def make_router(prefill: list[FakePrefill], decode: list[FakeDecode]) -> Router:
    pools = Pools()
    for i, p in enumerate(prefill):
        pools.prefill.append(WorkerSlot(f"prefill-{i}", Role.PREFILL, p))
    for i, d in enumerate(decode):
        pools.decode.append(WorkerSlot(f"decode-{i}", Role.DECODE, d, load=WorkerLoad("", free_pages=d.free_pages)))
    pools.refresh()
    return Router(pools, ServeMode.DISAGGREGATED)


def run(router: Router, req: GenerationRequest = REQ) -> tuple[list[int], Done]:
    items = list(router.generate(req))
    router.close()  # waits for background cancels
    *events, done = items
    return [e.token_id for e in events], done


def assert_settled(router: Router) -> None:
    """Nothing stays counted as in flight on any worker slot."""
    assert all(w.active == 0 for w in router.pools.workers)
    assert router._inflight == {}


def test_tokens_come_from_prefill_then_decode_with_every_state_stamped():
    p, d = FakePrefill(), FakeDecode()
    router = make_router([p], [d])
    tokens, done = run(router)
    assert tokens == [10, 11, 12]
    assert p.targets == ["127.0.0.1:7000"]  # the KV address learned at refresh, not fetched per request
    rec = done.record
    assert rec.state is RequestState.FINISHED and rec.completion_tokens == 3
    assert list(rec.stamps) == [
        RequestState.QUEUED,
        RequestState.RESERVED,
        RequestState.PREFILLING,
        RequestState.KV_TRANSFER,
        RequestState.DECODING,
        RequestState.FINISHED,
    ]
    assert rec.prefill.kv_bytes == 4096 and d.cancelled == [] and p.cancelled == []
    assert_settled(router)


@pytest.mark.parametrize("first_behaviour", ["dies", "busy"])
def test_prefill_retried_on_the_next_worker_before_a_token_went_out(first_behaviour):
    bad, good = FakePrefill(behaviour=first_behaviour), FakePrefill()
    bad.free_pages = 0
    router = make_router([bad, good], [FakeDecode()])
    router.pools.prefill[1].queued_tokens = 100  # the bad one is the first choice
    router.pools.prefill[0].queued_tokens = 0
    tokens, _ = run(router)
    assert tokens == [10, 11, 12] and len(bad.targets) == 1 and len(good.targets) == 1
    assert router.pools.prefill[0].alive is (first_behaviour == "busy")
    assert_settled(router)


def test_prefill_death_after_the_first_token_is_unavailable_and_frees_the_decode_side():
    d = FakeDecode()
    router = make_router([FakePrefill(behaviour="dies_after_token"), FakePrefill()], [d])
    got = []
    with pytest.raises(RouterError) as e:
        for item in router.generate(REQ):
            got.append(item)
    router.close()
    assert e.value.kind is ErrorKind.UNAVAILABLE and "died" in e.value.message
    assert [x.token_id for x in got] == [10]  # no silent retry once a token went out
    assert d.cancelled == ["r1"]
    assert_settled(router)


def test_a_fault_inside_a_worker_is_internal_with_its_message():
    router = make_router([FakePrefill(behaviour="fault")], [FakeDecode()])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.INTERNAL and "ValueError: bad thing" in e.value.message
    d = FakeDecode(events=[tok(11), WorkerFault("KeyError: 'x'")])
    router = make_router([FakePrefill()], [d])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.INTERNAL and "KeyError" in e.value.message
    assert_settled(router)


def test_decode_reservation_tries_the_next_worker_and_reports_busy_invalid_or_unavailable():
    busy = FakeDecode(admission=Admission.refuse(ErrorKind.BUSY, "decode engine full (16 requests)"), free_pages=9)
    ok = FakeDecode(free_pages=5)
    router = make_router([FakePrefill()], [busy, ok])
    tokens, _ = run(router)
    assert tokens == [10, 11, 12] and busy.reserved == ["r1"] and ok.reserved == ["r1"]
    assert_settled(router)

    router = make_router([FakePrefill()], [FakeDecode(admission=busy.admission)] * 2)
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.BUSY and "full" in e.value.message

    never = FakeDecode(admission=Admission.refuse(ErrorKind.INVALID, "request needs 20 KV pages, the worker has 10"))
    other = FakeDecode()
    router = make_router([FakePrefill()], [never, other])
    router.pools.decode[1].load = WorkerLoad("", free_pages=0)  # `never` is tried first
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.INVALID and other.reserved == []

    router = make_router([FakePrefill()], [FakeDecode(dead=True)])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.UNAVAILABLE and "no live decode worker" in e.value.message
    assert_settled(router)


def test_no_live_prefill_worker_is_unavailable_and_the_reservation_is_released():
    d = FakeDecode()
    router = make_router([FakePrefill(behaviour="dies")], [d])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.UNAVAILABLE and "no live prefill worker" in e.value.message
    assert d.cancelled == ["r1"]
    assert_settled(router)


def test_a_request_that_ends_with_its_first_token_frees_the_decode_reservation():
    d = FakeDecode()
    router = make_router([FakePrefill(behaviour="finishes")], [d])
    tokens, done = run(router)
    assert tokens == [10] and done.record.state is RequestState.FINISHED and d.cancelled == ["r1"]
    assert_settled(router)


def test_an_abandoned_stream_cancels_on_every_worker_and_duplicate_ids_are_invalid():
    p, d = FakePrefill(), FakeDecode()
    router = make_router([p], [d])
    gen = router.generate(REQ)
    assert next(gen).token_id == 10
    with pytest.raises(RouterError) as e:
        next(router.generate(REQ))
    assert e.value.kind is ErrorKind.INVALID
    gen.close()  # the client went away
    router.close()
    assert d.cancelled == ["r1"] and p.cancelled == ["r1"]
    assert_settled(router)


def test_decode_errors_end_the_request_with_their_kind():
    d = FakeDecode(events=[tok(11), RequestError("r1", ErrorKind.EVICTED, "KV pages exhausted")])
    router = make_router([FakePrefill()], [d])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.EVICTED
    assert_settled(router)


# ---- placement and pools --------------------------------------------------------------------------------------
def slot(name: str, role: Role = Role.DECODE, **kw) -> WorkerSlot:
    load = WorkerLoad("", free_pages=kw.pop("free_pages", 0))
    return WorkerSlot(name, role, FakeWorker(role), load=load, **kw)


def test_pick_prefill_takes_the_fewest_queued_tokens_among_live_workers():
    ws = [slot("a", queued_tokens=50), slot("b", queued_tokens=10, alive=False), slot("c", queued_tokens=20)]
    assert pick_prefill(ws).name == "c"
    assert pick_prefill([slot("x", alive=False)]) is None
    assert pick_prefill([slot("t1", queued_tokens=5), slot("t2", queued_tokens=5)]).name == "t1"


def test_decode_order_most_free_pages_then_fewest_active():
    ws = [
        slot("a", free_pages=5, active=0),
        slot("b", free_pages=9, active=3),
        slot("c", free_pages=9, active=1),
        slot("d", free_pages=99, alive=False),
    ]
    assert [w.name for w in decode_order(ws)] == ["c", "b", "a"]


def test_refresh_learns_addresses_once_per_incarnation_and_marks_silent_workers_dead():
    d = FakeDecode(kv_address="127.0.0.1:1")
    router = make_router([FakePrefill()], [d])
    s = router.pools.decode[0]
    assert (s.kv_address, s.restarts, s.alive, s.queued_tokens) == ("127.0.0.1:1", 0, True, 7)
    d.kv_address = "127.0.0.1:2"
    router.pools.refresh()
    assert s.kv_address == "127.0.0.1:1"  # same process: not described again
    d.incarnation = "inc-2"  # Ray restarted it
    router.pools.refresh()
    assert (s.kv_address, s.restarts) == ("127.0.0.1:2", 1)
    d.fail_load = True
    router.pools.refresh()
    assert not s.alive
    d.fail_load = False
    router.pools.refresh()
    assert s.alive and s.restarts == 1
