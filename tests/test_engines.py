"""The prefill, decode and colocated engines driven step by step (no engine threads, no Ray) over real tiny compiled
runtimes: first token in the KV header, continuous batching, failure isolation, admission kinds, and a leak check at
the end of every test. Greedy tokens are checked against the NumPy float64 reference (each chosen token is the
reference's argmax up to fp32 noise)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import TINY_GQA
from reference import NumpyLlama, random_params

from decode_worker.engine import DecodeEngine
from engine.decode_batch import DecodeState
from engine.kvmeta import decode_first_token
from engine.loop import OutputStream
from engine.messages import Admission, ErrorKind, GenerationRequest, PrefillResult, RequestError, WorkerOptions
from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.payload import ErrorCode, PayloadError, make_payload
from kvtransfer.runtime_io import receiver_checks
from kvtransfer.transport import KVSender, TransferResult
from llama_relax.generation import TokenEvent
from llama_relax.runtime import KVCacheConfig, ModelRuntime
from llama_relax.sampling import SamplingParams
from prefill_worker.engine import PrefillEngine, PrefillState

LENGTHS = [5, 40, 17, 3, 33]  # 40 and 33 exceed the 32-token prefill chunk
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def reserve(d: DecodeEngine, req: GenerationRequest) -> OutputStream:
    """Reserve on `d` (it must admit) and return the request's stream."""
    admission, stream = d.reserve(req)
    assert admission.ok, admission
    return stream


def submit(d: DecodeEngine, req: GenerationRequest) -> tuple[Admission, OutputStream | None]:
    """A colocated request, the way the router makes one: reserve, then prefill it there."""
    admission, stream = d.reserve(req)
    if admission.ok:
        assert d.prefill_local(req.request_id).ok
    return admission, stream


def engine_options(**kw) -> WorkerOptions:
    """Engine options for a runtime the test opened itself (no model path or cache dir is read)."""
    return WorkerOptions(model="", cache_dir="", **kw)


class FakeClock:
    """A lease clock the test moves by hand (`clock.now += s`): lease expiry then never depends on machine speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def params():
    return random_params(TINY_GQA, seed=17)


def new_runtime(compiled, params) -> ModelRuntime:
    return ModelRuntime(
        compiled, params, KVCacheConfig(max_batch_size=8, max_total_seq_len=1024, prefill_chunk_size=32)
    )


@pytest.fixture
def runtime(compiled_gqa, params):
    rt = new_runtime(compiled_gqa, params)
    yield rt
    rt.close()


@pytest.fixture
def second_runtime(compiled_gqa, params):
    rt = new_runtime(compiled_gqa, params)
    yield rt
    rt.close()


def prompts() -> list[tuple[int, ...]]:
    rng = np.random.default_rng(5)
    return [tuple(int(t) for t in rng.integers(0, TINY_GQA.vocab_size, n)) for n in LENGTHS]


def assert_greedy_matches_reference(params, prompt: tuple[int, ...], tokens: list[int]) -> None:
    ref = NumpyLlama(TINY_GQA, params)
    logits = ref.forward(0, list(prompt) + tokens[:-1])[len(prompt) - 1 :]  # [len(tokens), V]
    for i, (row, t) in enumerate(zip(logits, tokens, strict=True)):
        assert row[t] >= row.max() - 1e-3, f"token {i}: chose {t}, reference argmax {int(row.argmax())}"


def drain(stream: OutputStream) -> list[TokenEvent | RequestError]:
    out = []
    while True:
        item = stream.get(timeout=0)
        out.append(item)
        if isinstance(item, RequestError) or item.finish_reason is not None:
            return out


def assert_no_leaks(*engines) -> None:
    """Every page is free or the prefix cache's, every sequence is a cache entry's, the real KV cache agrees with
    the engine's accounting; after a flush everything is free."""
    for e in engines:
        assert all(owner.startswith("cache:") for owner in e.pool.held), e.pool.held
        assert sorted(e.runtime.sequence_ids()) == sorted(x.seq_id for x in e.cache.entries.values())
        load = e.load()
        assert load.free_pages + load.cached_pages == load.total_pages and load.sequences == 0
        assert e.runtime.free_pages() == e.pool.free  # a shared page is counted once, as TVM counts it
        e.flush_cache()
        assert e.pool.free == e.pool.total and not e.pool.held, e.pool.held
        assert e.runtime.sequence_ids() == [] and e.runtime.free_pages() == e.pool.total


def run_until(engine, done, timeout_s: float = 30.0) -> None:
    """Tick `engine` until `done()`; other threads (transfers) may be what it waits for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        if not engine.tick():
            time.sleep(0.002)
    raise AssertionError("engine did not get there")


def test_colocated_engine_streams_reference_tokens_with_continuous_batching(runtime, params):
    eng = DecodeEngine(runtime, None, engine_options(max_batch_size=8), name="colocated")
    streams = []
    for i, p in enumerate(prompts()):
        admission, stream = submit(eng, GenerationRequest(f"c{i}", p, GREEDY))
        assert admission.ok
        streams.append(stream)
        eng.tick()  # requests arrive while others decode
    run_until(eng, lambda: not eng.seqs)
    for p, s in zip(prompts(), streams, strict=True):
        events = drain(s)
        tokens = [e.token_id for e in events]
        assert len(tokens) == 6 and events[-1].finish_reason is not None
        assert_greedy_matches_reference(params, p, tokens)
    assert eng.load().max_batch_seen > 1
    assert_no_leaks(eng)


class Collect:
    """Events of one prefill request, in arrival order (the engine calls it from whichever thread)."""

    def __init__(self) -> None:
        self.items: list[TokenEvent | PrefillResult] = []
        self.done = threading.Event()

    def __call__(self, item) -> None:
        self.items.append(item)
        if isinstance(item, PrefillResult):
            self.done.set()


def test_prefill_engine_sends_kv_with_the_first_token_and_the_decode_engine_continues(runtime, second_runtime, params):
    """P is stepped here; D's engine thread runs, fed by a real gRPC receiver. D starts each sequence on import
    (the first token came in the header) and the tokens equal the reference."""
    d = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8))
    rx = GrpcKVReceiver(d.import_kv, on_orphaned=d.orphaned, **receiver_checks(second_runtime))
    address = rx.start()
    d.start()
    sender = GrpcKVSender()
    p = PrefillEngine(runtime, None, sender, engine_options(max_batch_size=8), transfer_threads=1)
    try:
        reqs = [GenerationRequest(f"p{i}", pr, GREEDY) for i, pr in enumerate(prompts())]
        outs, streams = [], {}
        for r in reqs:
            streams[r.request_id] = reserve(d, r)
            outs.append(Collect())
            assert p.submit(r, address, outs[-1]).ok
        assert p.load().queued == len(reqs)
        run_until(p, lambda: not p.batch.queue)
        assert all(o.done.wait(30) for o in outs)
        for r, o in zip(reqs, outs, strict=True):
            first, result = o.items
            assert isinstance(first, TokenEvent) and result.ok and result.first == first and result.kv_bytes > 0
            events = list(streams[r.request_id])
            tokens = [first.token_id] + [e.token_id for e in events]
            assert len(tokens) == 6
            assert_greedy_matches_reference(params, r.prompt_ids, tokens)
        run_until(p, lambda: not p.jobs)  # releases posted by the transfer thread ran inline
        assert_no_leaks(p, d)
    finally:
        sender.close()
        rx.stop(0)
        d.stop()


class RecordingSender(KVSender):
    """Keeps every payload instead of sending it (answers ok): lets a test hand the KV to a decode engine on
    the test's own thread, so both engines are stepped deterministically."""

    def __init__(self) -> None:
        self.payloads = []

    def send(self, payload, target, timeout_s):
        self.payloads.append(payload)
        return TransferResult(True, None, "", payload.header.total_bytes, 0.001)

    def cancel(self, request_id):
        raise AssertionError("not expected")

    def close(self):
        pass


def test_decode_engine_imports_kv_then_decodes_and_rejects_bad_imports(runtime, second_runtime, params):
    sender = RecordingSender()
    p = PrefillEngine(
        runtime, None, sender, engine_options(max_batch_size=8, kv_stream=False), transfer_threads=1
    )  # one piece
    d = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8))
    r = GenerationRequest("dx", prompts()[1], GREEDY)
    out = Collect()
    assert p.submit(r, "unused:1", out).ok
    run_until(p, lambda: out.done.is_set())
    payload = sender.payloads[0]
    first = decode_first_token(payload.header.meta)
    assert first.token_id == out.items[0].token_id and first.finish_reason is None
    with pytest.raises(PayloadError) as e:  # not reserved
        d.import_kv(payload.header, payload.k, payload.v)
    assert e.value.code is ErrorCode.IMPORT_FAILED
    stream = reserve(d, r)
    no_meta = make_payload(payload.k, payload.v, payload.header.layout_fingerprint, 0, "dx")
    with pytest.raises(PayloadError) as e:
        d.import_kv(no_meta.header, no_meta.k, no_meta.v)
    assert e.value.code is ErrorCode.MALFORMED and d.seqs["dx"].state is DecodeState.RESERVED
    # a rejected import leaves the cache as it was: the reservation's (empty) sequence
    assert second_runtime.sequence_ids() == [d.seqs["dx"].seq_id] and second_runtime.free_pages() == d.pool.total
    d.import_kv(payload.header, payload.k, payload.v)
    assert d.seqs["dx"].state is DecodeState.DECODING
    run_until(d, lambda: not d.seqs)
    tokens = [first.token_id] + [e.token_id for e in stream]
    assert_greedy_matches_reference(params, r.prompt_ids, tokens)
    run_until(p, lambda: not p.jobs)
    assert_no_leaks(p, d)


def test_a_failed_prefill_forward_fails_only_its_requests(runtime, monkeypatch):
    p = PrefillEngine(runtime, None, RecordingSender(), engine_options(max_batch_size=1), transfer_threads=1)
    outs = {f"f{i}": Collect() for i in range(3)}
    for i, (rid, o) in enumerate(outs.items()):
        assert p.submit(GenerationRequest(rid, prompts()[i], GREEDY), "unused:1", o).ok
    real = runtime.forward_hidden
    calls = []

    def flaky(seq_ids, chunks):
        calls.append(seq_ids)
        if len(calls) == 2:  # the second forward (request f1) breaks
            raise RuntimeError("injected forward failure")
        return real(seq_ids, chunks)

    monkeypatch.setattr(runtime, "forward_hidden", flaky)
    run_until(p, lambda: all(o.done.is_set() for o in outs.values()))
    results = {rid: o.items[-1] for rid, o in outs.items()}
    assert results["f0"].ok and results["f2"].ok
    assert results["f1"].error.kind is ErrorKind.INTERNAL and "injected" in results["f1"].error.message
    assert p.error is None  # the engine is not broken
    run_until(p, lambda: not p.jobs)
    assert_no_leaks(p)


def test_a_failed_decode_step_fails_its_batch_and_the_engine_goes_on(runtime, monkeypatch):
    eng = DecodeEngine(runtime, None, engine_options(max_batch_size=8), name="colocated")
    _, s1 = submit(eng, GenerationRequest("a", prompts()[0], GREEDY))
    real = runtime.decode
    monkeypatch.setattr(runtime, "decode", lambda *a: (_ for _ in ()).throw(RuntimeError("injected decode failure")))
    run_until(eng, lambda: not eng.seqs)
    events = drain(s1)
    assert isinstance(events[-1], RequestError) and events[-1].kind is ErrorKind.INTERNAL
    monkeypatch.setattr(runtime, "decode", real)
    _, s2 = submit(eng, GenerationRequest("b", prompts()[0], GREEDY))
    run_until(eng, lambda: not eng.seqs)
    assert [e.token_id for e in drain(s2)] and eng.error is None
    assert_no_leaks(eng)


def test_admission_kinds_and_cancel_release_everything(runtime, second_runtime):
    d = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8, output_slice=4))
    p = PrefillEngine(runtime, None, RecordingSender(), engine_options(max_batch_size=8, max_queue=2))
    r = GenerationRequest("x", prompts()[1], GREEDY)
    assert d.reserve(r)[0].ok
    assert d.reserve(r) == (Admission.refuse(ErrorKind.INVALID, "request 'x' is already on this worker"), None)
    huge = GenerationRequest("huge", tuple([1] * 200), SamplingParams(max_tokens=50))
    small_pool = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8))
    small_pool.pool.total = 4
    assert small_pool.reserve(huge)[0].kind is ErrorKind.INVALID  # can never fit
    assert d.cancel("x") and not d.cancel("x")
    out = [Collect() for _ in range(3)]
    assert p.submit(GenerationRequest("q0", prompts()[0], GREEDY), "t:1", out[0]).ok
    assert p.submit(GenerationRequest("q1", prompts()[0], GREEDY), "t:1", out[1]).ok
    full = p.submit(GenerationRequest("q2", prompts()[0], GREEDY), "t:1", out[2])
    assert full.kind is ErrorKind.BUSY and "prefill queue full" in full.reason
    assert p.jobs["q0"].state is PrefillState.QUEUED
    assert p.cancel("q0") and out[0].items[-1].error.kind is ErrorKind.CANCELLED
    assert p.cancel("q1")
    assert_no_leaks(p, d)


def run_colocated(eng: DecodeEngine, req: GenerationRequest) -> list[int]:
    admission, stream = submit(eng, req)
    assert admission.ok, admission
    run_until(eng, lambda: req.request_id not in eng.seqs)
    events = drain(stream)
    assert isinstance(events[-1], TokenEvent), events[-1]
    return [e.token_id for e in events]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=123, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_a_resumed_request_continues_exactly_where_the_unfailed_run_went(runtime, sampling):
    """Migration's contract: prefilling prompt + the first k output tokens and sampling step k gives the same
    continuation as the unfailed run (sampling is keyed by (seed, step))."""
    eng = DecodeEngine(runtime, None, engine_options(max_batch_size=8), name="colocated")
    prompt = prompts()[1]
    full = run_colocated(eng, GenerationRequest("full", prompt, sampling))
    for k in (1, 3, 7):
        assert run_colocated(eng, GenerationRequest(f"resume{k}", prompt, sampling, tuple(full[:k]))) == full[k:]
    assert_no_leaks(eng)


def test_the_prefill_engine_resumes_too_and_the_kv_covers_prompt_plus_produced(runtime, second_runtime):
    sender = RecordingSender()
    p = PrefillEngine(runtime, None, sender, engine_options(max_batch_size=8), transfer_threads=1)
    d = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8))
    prompt, params = prompts()[2], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    colocated = DecodeEngine(second_runtime, None, engine_options(), name="colocated")
    full = run_colocated(colocated, GenerationRequest("f", prompt, params))
    assert_no_leaks(colocated)  # and flushed: `d` below shares its runtime
    req = GenerationRequest("m~1", prompt, params, tuple(full[:2]))
    out = Collect()
    stream = reserve(d, req)
    assert p.submit(req, "unused:1", out).ok
    run_until(p, lambda: out.done.is_set())
    payload = sender.payloads[0]
    assert payload.header.end == len(prompt) + 2 and out.items[0].token_id == full[2]
    d.import_kv(payload.header, payload.k, payload.v)
    run_until(d, lambda: not d.seqs)
    assert [out.items[0].token_id] + [e.token_id for e in stream] == full[2:]
    run_until(p, lambda: not p.jobs)
    assert_no_leaks(p, d)


def test_a_reservation_whose_kv_never_comes_is_freed_by_its_lease(second_runtime):
    clock = FakeClock()
    d = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8, kv_lease_s=0.2), clock=clock)
    stream = reserve(d, GenerationRequest("lost", prompts()[0], GREEDY))
    clock.now += 0.3
    d.tick()
    assert "lost" not in d.seqs and d.load().lease_expired == 1
    error = stream.get(timeout=0)
    assert error.kind is ErrorKind.TRANSFER_FAILED and "lease" in error.message
    reserve(d, GenerationRequest("late", prompts()[0], GREEDY))  # its KV never comes either
    clock.now += 0.3
    d.tick()
    assert not d.seqs and d.load().lease_expired == 2
    assert_no_leaks(d)


def test_prefill_local_turns_a_reservation_into_a_local_prefill(second_runtime, params):
    d = DecodeEngine(second_runtime, None, engine_options(max_batch_size=8))
    req = GenerationRequest("local", prompts()[3], GREEDY)
    stream = reserve(d, req)
    assert d.prefill_local("local").ok
    run_until(d, lambda: not d.seqs)
    tokens = [e.token_id for e in drain(stream)]
    assert len(tokens) == 6
    assert_greedy_matches_reference(params, req.prompt_ids, tokens)
    missing = d.prefill_local("nobody")
    assert missing.kind is ErrorKind.UNAVAILABLE and "no reservation" in missing.reason
    assert_no_leaks(d)


class FlakySender(RecordingSender):
    """Fails the first `failures` sends with `error`, then records (answers ok)."""

    def __init__(self, failures: int, error: ErrorCode) -> None:
        super().__init__()
        self.failures, self.error, self.attempts = failures, error, 0

    def send(self, payload, target, timeout_s):
        self.attempts += 1
        if self.attempts <= self.failures:
            return TransferResult.failure(self.error, "injected", 0, 0.001)
        return super().send(payload, target, timeout_s)


@pytest.mark.parametrize(
    ("failures", "error", "ok", "attempts", "expired"),
    [
        (1, ErrorCode.UNAVAILABLE, True, 2, 0),  # retried once, then delivered
        (2, ErrorCode.CHECKSUM_MISMATCH, False, 2, 0),  # retried once, then reported (the router recomputes)
        (1, ErrorCode.IMPORT_FAILED, False, 1, 0),  # the receiver refused it: no retry
        (1, ErrorCode.TIMEOUT, False, 1, 1),  # the lease ran out: freed and counted
    ],
)
def test_a_failed_send_is_retried_once_and_a_lease_that_runs_out_is_counted(
    runtime, failures, error, ok, attempts, expired
):
    sender = FlakySender(failures, error)
    p = PrefillEngine(runtime, None, sender, engine_options(max_batch_size=8), transfer_threads=1)
    out = Collect()
    assert p.submit(GenerationRequest("s", prompts()[0], GREEDY), "unused:1", out).ok
    run_until(p, lambda: out.done.is_set())
    result = out.items[-1]
    assert result.ok is ok and sender.attempts == attempts
    assert result.transfer_retries == attempts - 1
    if not ok:
        assert result.error.kind is ErrorKind.TRANSFER_FAILED
    run_until(p, lambda: not p.jobs)
    assert p.load().lease_expired == expired
    assert_no_leaks(p)


def test_fault_injector_marks_stages_damages_copies_and_fires_a_limited_number_of_times(tmp_path):
    from engine.faults import Action, Fault, FaultInjector, FaultPlan, Stage

    plan = FaultPlan((Fault.parse("kv_send:corruptx2"), Fault.parse("decode_step:pause:0.01")), str(tmp_path))
    inj = FaultInjector(plan)
    k = np.zeros((2, 3), np.float32)
    for _ in range(2):
        fault = inj.hit(Stage.KV_SEND)
        assert fault.action is Action.CORRUPT
        bad = inj.damaged(fault, k)
        assert bad is not k and not np.array_equal(bad, k) and not k.any()
    assert inj.hit(Stage.KV_SEND) is None and inj.damaged(None, k) is k
    assert (tmp_path / "kv_send").exists() and not (tmp_path / "decode_step").exists()
    assert inj.hit(Stage.DECODE_STEP).action is Action.PAUSE and inj.hit(Stage.PREFILL_FORWARD) is None
    with pytest.raises(ValueError, match="kv_send only"):
        Fault.parse("decode_step:corrupt")
    with pytest.raises(ValueError, match="expected STAGE"):
        Fault.parse("nonsense")
