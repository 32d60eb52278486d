"""The router's request flow and placement against fake workers that implement the typed worker protocols
(no Ray, no model): retries, refusals, failures as explicit outcomes, cancels, and the pools' refresh."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from serving import wait_until

from engine.messages import (
    ADMITTED,
    Admission,
    ErrorKind,
    GenerationRequest,
    Output,
    PrefillResult,
    RequestError,
    Role,
    WorkerInfo,
    WorkerLoad,
)
from engine.prefix_cache import page_hashes
from engine.protocols import WorkerFault, WorkerGone
from llama_relax.generation import FinishReason, TokenEvent
from llama_relax.sampling import SamplingParams
from router.pools import Pools, WorkerSlot, cached_pages, decode_order, pick_prefill
from router.router import Done, RequestState, Router, RouterError, RouterOptions, ServeMode
from router.scaling import drained

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
    prefixes: tuple[int, ...] = ()  # page hashes it reports holding
    cancelled: list[str] = field(default_factory=list)

    def describe(self) -> WorkerInfo:
        return WorkerInfo(self.role, self.incarnation, 1, self.kv_address)

    def load(self) -> WorkerLoad:
        if self.fail_load:
            raise WorkerGone("not answering")
        return WorkerLoad(
            self.incarnation, free_pages=self.free_pages, total_pages=10, queued_tokens=7, cached_prefixes=self.prefixes
        )

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    def ping(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass
class FakePrefill(FakeWorker):
    """Samples output token `10 + len(resume_ids)` (a token's value is its position + 10, so a gap or a duplicate
    shows in the tokens)."""

    role: Role = Role.PREFILL
    behaviour: str = "ok"  # ok | dies | busy | closing | dies_after_token | closing_after_token | finishes | fault
    # | transfer_fails
    seen: list[GenerationRequest] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    kv_begins: list[int] = field(default_factory=list)
    on_stream: Callable[[], None] | None = None  # called as a stream starts (to look at the router meanwhile)

    def prefill_stream(
        self, req: GenerationRequest, kv_target: str, kv_begin: int = 0
    ) -> Iterator[TokenEvent | PrefillResult]:
        self.seen.append(req)
        self.targets.append(kv_target)
        self.kv_begins.append(kv_begin)
        if self.on_stream is not None:
            self.on_stream()
        rid, behaviour = req.request_id, self.behaviour
        if behaviour.endswith("_once"):
            behaviour, self.behaviour = behaviour.removesuffix("_once"), "ok"
        if behaviour == "dies":
            raise WorkerGone("actor died")
        if behaviour == "fault":
            raise WorkerFault("ValueError: bad thing")
        if behaviour == "busy":
            yield PrefillResult(rid, None, RequestError(rid, ErrorKind.BUSY, "prefill queue full"))
            return
        if behaviour == "closing":
            yield PrefillResult(rid, None, RequestError(rid, ErrorKind.UNAVAILABLE, "prefill worker shutting down"))
            return
        first = tok(10 + len(req.resume_ids), last=behaviour == "finishes")
        yield first
        if behaviour == "dies_after_token":
            raise WorkerGone("actor died")
        if behaviour == "closing_after_token":
            yield PrefillResult(rid, first, RequestError(rid, ErrorKind.UNAVAILABLE, "prefill worker shutting down"))
            return
        if behaviour == "transfer_fails":
            error = RequestError(rid, ErrorKind.TRANSFER_FAILED, "CHECKSUM_MISMATCH after a retry")
            yield PrefillResult(rid, first, error, transfer_retries=1)
            return
        yield PrefillResult(rid, first, None, 0.01, 0.02, 0.003, 4096)


@dataclass
class FakeDecode(FakeWorker):
    """Continues after the prefill's token up to `max_tokens`; `fail` breaks one stream after `fail_after`
    events (a WorkerGone, a WorkerFault or a RequestError), then it serves normally."""

    role: Role = Role.DECODE
    kv_address: str = "127.0.0.1:7000"
    admission: Admission = ADMITTED
    fail: Exception | RequestError | None = None
    fail_after: int = 1
    reserved: list[GenerationRequest] = field(default_factory=list)
    local: list[str] = field(default_factory=list)
    dead: bool = False
    _prefilling: set[str] = field(default_factory=set)  # reservations told to prefill here, not yet streaming

    def reserve(self, req: GenerationRequest) -> Iterator[Admission | Output]:
        if self.dead:
            raise WorkerGone("actor died")
        self.reserved.append(req)
        return self._reservation(req)

    def _reservation(self, req: GenerationRequest) -> Iterator[Admission | Output]:
        """The answer, then (admitted) the events: every one after `prefill_local`, else those after token 1 (the
        stream is lazy, so it starts after the router chose)."""
        yield self.admission
        if self.admission.ok:
            local = req.request_id in self._prefilling
            self._prefilling.discard(req.request_id)
            yield from self._events(req.request_id, len(req.resume_ids) + (0 if local else 1))

    def _events(self, request_id: str, start: int) -> Iterator[Output]:
        req = next(r for r in self.reserved if r.request_id == request_id)
        for i, pos in enumerate(range(start, req.params.max_tokens)):
            if self.fail is not None and i == self.fail_after:
                fail, self.fail = self.fail, None
                if isinstance(fail, Exception):
                    raise fail
                yield fail
                return
            yield tok(10 + pos, last=pos == req.params.max_tokens - 1)

    def prefill_local(self, request_id: str) -> Admission:
        self.local.append(request_id)
        self._prefilling.add(request_id)
        return ADMITTED


def make_router(prefill: list[FakePrefill], decode: list[FakeDecode], **options) -> Router:
    pools = Pools()
    for i, p in enumerate(prefill):
        pools.prefill.append(WorkerSlot(f"prefill-{i}", Role.PREFILL, p))
    for i, d in enumerate(decode):
        pools.decode.append(WorkerSlot(f"decode-{i}", Role.DECODE, d, load=WorkerLoad("", free_pages=d.free_pages)))
    pools.refresh()
    opts = {"recovery_timeout_s": 0.3, "max_queue_wait_s": 0.3, "local_prefill_max_tokens": 0, **options}
    return Router(pools, ServeMode.DISAGGREGATED, RouterOptions(**opts))


def run(router: Router, req: GenerationRequest = REQ) -> tuple[list[int], Done]:
    try:
        items = list(router.generate(req))
    finally:
        router.close()  # waits for background cancels
    *events, done = items
    return [e.token_id for e in events], done


def assert_settled(router: Router) -> None:
    """Nothing stays counted as in flight on any worker slot, nothing waits."""
    assert all(w.active == 0 for w in router.pools.workers)
    assert router._inflight == {} and router.admission.waiting == 0


def test_tokens_come_from_prefill_then_decode_with_every_state_stamped():
    p, d = FakePrefill(), FakeDecode()
    router = make_router([p], [d])
    tokens, done = run(router)
    assert tokens == [10, 11, 12]
    assert p.targets == ["127.0.0.1:7000"]  # the KV address learned at refresh, not fetched per request
    rec = done.record
    assert rec.state is RequestState.FINISHED and rec.completion_tokens == 3 and rec.migrations == 0
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


@pytest.mark.parametrize("first_behaviour", ["dies", "busy", "closing"])
def test_prefill_retried_on_the_next_worker_before_a_token_went_out(first_behaviour):
    bad, good = FakePrefill(behaviour=first_behaviour), FakePrefill()
    router = make_router([bad, good], [FakeDecode()])
    router.pools.prefill[1].queued_tokens = 100  # the bad one is the first choice
    router.pools.prefill[0].queued_tokens = 0
    tokens, done = run(router)
    assert tokens == [10, 11, 12] and len(bad.seen) == 1 and len(good.seen) == 1
    assert router.pools.prefill[0].alive is (first_behaviour != "dies")
    assert done.record.migrations == 0
    assert_settled(router)


@pytest.mark.parametrize(
    "failure",
    [
        WorkerGone("actor died"),
        RequestError("x", ErrorKind.UNAVAILABLE, "no request on this worker"),
        RequestError("x", ErrorKind.EVICTED, "KV pages exhausted"),
    ],
    ids=["decode-died", "request-lost", "evicted"],
)
def test_a_lost_decode_stream_migrates_and_the_client_sees_no_gap_or_duplicate(failure):
    """Tokens 10, 11 reached the client, then the decode side lost the request: a new attempt (its own id)
    re-prefills the prompt plus [10, 11] and continues from token 12."""
    p = FakePrefill()
    d1, d2 = FakeDecode(fail=failure, fail_after=1, free_pages=9), FakeDecode(free_pages=5)
    router = make_router([p], [d1, d2])
    req = GenerationRequest("r1", (1, 2, 3), SamplingParams(max_tokens=6, temperature=0))
    tokens, done = run(router, req)
    assert tokens == [10, 11, 12, 13, 14, 15]
    assert done.record.migrations == 1 and router.metrics.migrations._value.get() == 1
    second = p.seen[1]
    assert second.request_id == "r1~1" and second.resume_ids == (10, 11) and second.prompt_ids == (1, 2, 3)
    assert "r1" in d1.cancelled  # the old attempt is released wherever it was
    if isinstance(failure, WorkerGone):
        assert not router.pools.decode[0].alive and d2.reserved[-1].request_id == "r1~1"
    assert_settled(router)


def test_a_prefill_in_flight_counts_on_its_worker_so_a_drain_waits_for_it():
    """The router claims a prefill worker (`active`) as it picks it, under the pool lock the planner marks a
    worker draining under: a drain that began before the pick excludes the worker, one after it sees it busy."""
    seen: list[tuple[int, bool]] = []
    p = FakePrefill(on_stream=lambda: seen.append((router.pools.prefill[0].active, drained(router.pools.prefill[0]))))
    router = make_router([p], [FakeDecode()])
    run(router)
    assert seen == [(1, False)]
    assert_settled(router)
    router.pools.prefill[0].draining = True  # drained: the decode worker prefills by itself, the drained one idles
    tokens, _ = run(router, dataclasses.replace(REQ, request_id="r2"))
    assert tokens == [10, 11, 12] and len(p.seen) == 1


def test_a_failed_transfer_after_the_first_token_is_recomputed_and_prefill_death_too():
    p = FakePrefill(behaviour="transfer_fails_once")
    router = make_router([p], [FakeDecode()])
    tokens, done = run(router)
    assert tokens == [10, 11, 12] and done.record.migrations == 1
    assert p.seen[1].resume_ids == (10,) and router.metrics.kv_retries._value.get() == 1
    for behaviour in ("dies_after_token_once", "closing_after_token_once"):  # a worker lost or shutting down
        p2 = FakePrefill(behaviour=behaviour)
        router = make_router([p2], [FakeDecode()])
        tokens, done = run(router)
        assert tokens == [10, 11, 12] and done.record.migrations == 1
        assert_settled(router)


def test_migrations_stop_at_the_limit_with_an_explicit_unavailable():
    d = FakeDecode()
    router = make_router([FakePrefill()], [d], migration_limit=2)
    d.fail, d.fail_after = WorkerGone("died"), 0

    def always_fail(request_id: str, start: int) -> Iterator[Output]:
        raise WorkerGone("died again")
        yield  # a generator: it fails where the events would start

    d._events = always_fail
    router.pools.record = lambda w, ok: None  # keep the worker in rotation for this test
    router.pools.mark_dead = lambda w: None
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.UNAVAILABLE and "gave up after 2 migrations" in e.value.message
    assert_settled(router)


def test_with_no_prefill_worker_alive_the_decode_worker_prefills_itself():
    d = FakeDecode()
    router = make_router([FakePrefill(behaviour="dies")], [d])
    tokens, _ = run(router)
    assert tokens == [10, 11, 12] and d.local == ["r1"] and router.metrics.fallbacks._value.get() == 1
    router = make_router([], [FakeDecode()])  # an empty prefill pool
    tokens, _ = run(router)
    assert tokens == [10, 11, 12]
    assert_settled(router)


def test_a_fault_inside_a_worker_is_internal_with_its_message():
    router = make_router([FakePrefill(behaviour="fault")], [FakeDecode()])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.INTERNAL and "ValueError: bad thing" in e.value.message
    router = make_router([FakePrefill()], [FakeDecode(fail=WorkerFault("KeyError: 'x'"))])
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.INTERNAL and "KeyError" in e.value.message
    assert_settled(router)


def test_decode_reservation_tries_the_next_worker_and_reports_busy_invalid_or_unavailable():
    busy = FakeDecode(admission=Admission.refuse(ErrorKind.BUSY, "decode engine full (16 requests)"), free_pages=9)
    ok = FakeDecode(free_pages=5)
    router = make_router([FakePrefill()], [busy, ok])
    tokens, _ = run(router)
    assert tokens == [10, 11, 12] and [r.request_id for r in busy.reserved] == ["r1"] == [
        r.request_id for r in ok.reserved
    ]
    assert_settled(router)

    router = make_router([FakePrefill()], [FakeDecode(admission=busy.admission)] * 2)
    with pytest.raises(RouterError) as e:
        run(router)
    assert e.value.kind is ErrorKind.BUSY and "full" in e.value.message and "max-queue-wait" in e.value.message

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


def test_a_full_decode_pool_queues_requests_in_order_until_room_frees_up():
    d = FakeDecode(admission=Admission.refuse(ErrorKind.BUSY, "decode engine full"))
    router = make_router([FakePrefill()], [d], max_queue_wait_s=5.0)
    order: list[str] = []
    reqs = [GenerationRequest(f"q{i}", (1, 2), SamplingParams(max_tokens=2, temperature=0)) for i in range(3)]

    def client(r: GenerationRequest) -> None:
        for item in router.generate(r):
            if isinstance(item, Done):
                order.append(r.request_id)

    threads = [threading.Thread(target=client, args=(r,)) for r in reqs]
    for i, t in enumerate(threads):
        t.start()
        wait_until(lambda i=i: router.admission.waiting == i + 1)  # arrival order q0, q1, q2
    assert order == []
    d.admission = ADMITTED  # room frees up
    for t in threads:
        t.join(10)
    router.close()
    assert order == ["q0", "q1", "q2"]
    assert_settled(router)


def test_the_admission_queue_is_bounded():
    d = FakeDecode(admission=Admission.refuse(ErrorKind.BUSY, "decode engine full"))
    router = make_router([FakePrefill()], [d], max_queue_wait_s=2.0, max_queued=1)

    def wait_and_fail() -> None:
        with pytest.raises(RouterError):
            list(router.generate(REQ))

    waiting = threading.Thread(target=wait_and_fail)
    waiting.start()
    wait_until(lambda: router.admission.waiting == 1)
    with pytest.raises(RouterError) as e:
        list(router.generate(GenerationRequest("r2", (1,), SamplingParams(max_tokens=2))))
    assert e.value.kind is ErrorKind.BUSY and "queue full" in e.value.message
    waiting.join(5)
    router.close()
    assert_settled(router)


def test_a_request_waits_for_a_decode_worker_to_come_back():
    d = FakeDecode(dead=True)
    router = make_router([FakePrefill()], [d], recovery_timeout_s=5.0)
    router.pools.decode[0].alive = False

    def comes_back() -> None:
        wait_until(lambda: router.admission.waiting == 1)  # the request is waiting for a decode worker
        d.dead = False
        router.pools.decode[0].alive = True

    threading.Thread(target=comes_back).start()
    tokens, done = run(router)
    assert tokens == [10, 11, 12] and done.record.queue_wait_s > 0
    assert_settled(router)


def test_a_worker_that_fails_calls_in_a_row_cools_down():
    flaky = FakeDecode(free_pages=9)
    calls = []

    def reserve(req):
        calls.append(req.request_id)
        raise WorkerFault("RuntimeError: broken")

    flaky.reserve = reserve
    router = make_router([FakePrefill()], [flaky, FakeDecode(free_pages=5)])
    for i in range(4):
        run(router, GenerationRequest(f"b{i}", (1,), SamplingParams(max_tokens=2)))
    assert calls == ["b0", "b1", "b2"]  # out of rotation after the third failure in a row
    assert not router.pools.decode[0].available and router.pools.decode[0].alive
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


def test_drain_refuses_new_requests_and_waits_for_the_running_ones():
    router = make_router([FakePrefill()], [FakeDecode()])
    gen = router.generate(REQ)
    assert next(gen).token_id == 10
    result: list[int] = []
    drainer = threading.Thread(target=lambda: result.append(router.drain(5.0)))
    drainer.start()
    wait_until(lambda: router._draining)
    with pytest.raises(RouterError) as e:
        next(router.generate(GenerationRequest("late", (1,), SamplingParams(max_tokens=2))))
    assert e.value.kind is ErrorKind.UNAVAILABLE and "shutting down" in e.value.message
    assert [x.token_id for x in gen if not isinstance(x, Done)] == [11, 12]
    drainer.join(5)
    router.close()
    assert result == [0]
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


def test_decode_order_fewest_active_then_most_free_pages():
    ws = [
        slot("a", free_pages=5, active=1),
        slot("b", free_pages=9, active=3),
        slot("c", free_pages=9, active=1),
        slot("d", free_pages=99, alive=False),
        slot("e", free_pages=1, active=0),
    ]
    assert [w.name for w in decode_order(ws)] == ["e", "c", "a", "b"]


LONG = GenerationRequest("long", tuple(range(100, 300)), SamplingParams(max_tokens=3, temperature=0))


def test_a_short_uncached_part_is_prefilled_by_the_decode_worker_and_a_long_one_sends_only_the_rest():
    p = FakePrefill()
    d = FakeDecode(admission=Admission(cached_tokens=150))
    router = make_router([p], [d], local_prefill_max_tokens=64)
    tokens, done = run(router, LONG)  # 50 uncached tokens: local
    assert tokens == [10, 11, 12] and d.local == ["long"] and p.seen == []
    assert router.metrics.local_prefills._value.get() == 1 and done.record.cached_tokens == 150
    d.admission = Admission(cached_tokens=100)  # 100 uncached: the prefill worker, KV from token 100 on
    router = make_router([p], [d], local_prefill_max_tokens=64)
    tokens, _ = run(router, LONG)
    assert tokens == [10, 11, 12] and p.kv_begins == [100] and d.local == ["long"]
    router = make_router([p], [FakeDecode(admission=Admission(cached_tokens=199))], local_prefill_max_tokens=0)
    run(router, LONG)  # 0 turns local prefill off
    assert p.kv_begins == [100, 199] and router.metrics.local_prefills._value.get() == 0
    assert_settled(router)


def test_cache_aware_placement_prefers_the_longest_cached_prefix_within_the_load_threshold():
    hashes = page_hashes(LONG.token_ids)  # 12 full pages
    a, b, c = slot("a", active=0), slot("b", active=2), slot("c", active=1)
    b.prefixes, c.prefixes = set(hashes[:8]), set(hashes[:3])
    assert [w.name for w in decode_order([a, b, c])] == ["a", "c", "b"]  # no prompt: load only
    assert [w.name for w in decode_order([a, b, c], hashes, balance_requests=4)] == ["b", "a", "c"]
    assert [w.name for w in decode_order([a, b, c], hashes, balance_requests=1)] == ["a", "c", "b"]  # b too busy
    assert cached_pages(b, hashes) == 8 and cached_pages(b, page_hashes((1, *LONG.token_ids))) == 0  # chained
    p, q = slot("p", queued_tokens=0), slot("q", queued_tokens=900)
    q.prefixes = set(hashes)
    assert pick_prefill([p, q], hashes, balance_tokens=1024).name == "q"
    assert pick_prefill([p, q], hashes, balance_tokens=512).name == "p"


def test_the_router_view_follows_placements_and_the_workers_reports():
    d0, d1 = FakeDecode(), FakeDecode()
    router = make_router([FakePrefill()], [d0, d1])
    run(router, LONG)
    again = GenerationRequest("again", (*LONG.prompt_ids, 7, 8, 9), LONG.params)
    run(router, again)  # the router remembers where it sent the prompt: the same worker
    first = next(w for w in router.pools.decode if w.client.reserved)
    assert [r.request_id for r in first.client.reserved] == ["long", "again"]
    first.client.prefixes = ()  # the worker evicted it and reports so: the view forgets it
    first.placed.clear()
    router.pools.refresh()
    assert first.prefixes == set() and cached_pages(first, page_hashes(LONG.token_ids)) == 0
    other = next(w for w in router.pools.decode if w is not first)
    other.client.prefixes = tuple(page_hashes(LONG.token_ids))
    router.pools.refresh()
    router = Router(router.pools, ServeMode.DISAGGREGATED, router.options)
    run(router, GenerationRequest("third", LONG.prompt_ids, LONG.params))
    assert other.client.reserved[-1].request_id == "third"


def test_refresh_learns_addresses_once_per_incarnation_and_marks_silent_workers_dead():
    d = FakeDecode(kv_address="127.0.0.1:1")
    router = make_router([FakePrefill()], [d])
    router.close()
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
