"""KV streaming (#17): a prompt's KV leaves the prefill engine piece by piece while later chunks compute.

Engines are stepped on the test's thread over real tiny compiled runtimes; pieces are recorded by a sender and
imported into a decode engine by hand, so every order and every cut can be staged. Checked: the pieces tile the
prompt and are bit-identical to a one-shot export; decode output equals the one-shot run's and the NumPy reference;
out-of-order pieces are rejected without a change, a repeated piece is acknowledged without a second import; a
stream cut after k of n pieces fails the request (TRANSFER_FAILED), frees everything on both sides, and a retry
or a local recompute starts clean. Every test ends with a leak check."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_engines import (
    GREEDY,
    Collect,
    FakeClock,
    assert_greedy_matches_reference,
    assert_no_leaks,
    drain,
    engine_options,
    new_runtime,
    params,  # noqa: F401 (fixture)
    reserve,
    run_until,
)

from decode_worker.engine import DecodeEngine
from engine.decode_batch import DecodeState
from engine.kvmeta import decode_first_token, is_partial
from engine.messages import ErrorKind, GenerationRequest, RequestError
from kvtransfer.payload import ErrorCode, PayloadError
from kvtransfer.transport import CancelResult, KVSender, TransferResult
from prefill_worker.engine import PrefillEngine

PROMPT_LEN = 150  # 5 forwards of the 32-token chunk


@pytest.fixture
def runtimes(compiled_gqa, params):  # noqa: F811
    rts = [new_runtime(compiled_gqa, params) for _ in range(2)]
    yield rts
    for rt in rts:
        rt.close()


def prompt(seed: int = 3) -> tuple[int, ...]:
    from conftest import TINY_GQA

    rng = np.random.default_rng(seed)
    return tuple(int(t) for t in rng.integers(0, TINY_GQA.vocab_size, PROMPT_LEN))


class PieceSender(KVSender):
    """Records every payload and answers ok, except for the sends `fail_at` (0-based send index) names."""

    def __init__(self, fail_at: frozenset[int] = frozenset()) -> None:
        self.payloads = []
        self.fail_at = fail_at
        self.sends = 0
        self.lock = threading.Lock()

    def send(self, payload, target, timeout_s):
        with self.lock:
            i, self.sends = self.sends, self.sends + 1
        if i in self.fail_at:
            return TransferResult.failure(ErrorCode.UNAVAILABLE, "injected reset", 0, 0.001)
        self.payloads.append(payload)
        return TransferResult(True, None, "", payload.header.total_bytes, 0.001)

    def cancel(self, request_id):
        return CancelResult.NOT_FOUND

    def close(self):
        pass


def prefill(runtime, sender, req, **kw) -> Collect:
    p = PrefillEngine(runtime, None, sender, engine_options(max_batch_size=8, **kw), transfer_threads=1)
    out = Collect()
    assert p.submit(req, "unused:1", out).ok
    run_until(p, lambda: out.done.is_set() and not p.jobs)
    assert_no_leaks(p)
    return out


def test_streamed_pieces_tile_the_prompt_and_are_bit_identical_to_one_shot(runtimes, params):  # noqa: F811
    req = GenerationRequest("s", prompt(), GREEDY)
    streamed, one = PieceSender(), PieceSender()
    out = prefill(runtimes[0], streamed, req, kv_stream_tail=0)  # the same forwards as the one-shot run below
    prefill(runtimes[0], one, req, kv_stream=False, prefix_cache=False)
    ranges = [(p.header.begin, p.header.end) for p in streamed.payloads]
    assert ranges == [(0, 32), (32, 64), (64, 96), (96, 128), (128, PROMPT_LEN)]
    assert all(is_partial(p.header.meta) for p in streamed.payloads[:-1])
    assert decode_first_token(streamed.payloads[-1].header.meta).token_id == out.items[0].token_id
    (whole,) = one.payloads
    for name in ("k", "v"):
        joined = np.concatenate([getattr(p, name) for p in streamed.payloads], axis=1)  # [L, n, Hkv, d]
        assert joined.tobytes() == getattr(whole, name).tobytes()
    assert out.items[-1].ok and out.items[-1].kv_bytes == whole.header.total_bytes

    d = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8))
    stream = reserve(d, req)
    for p in streamed.payloads[:-1]:
        d.import_kv(p.header, p.k, p.v)
        assert d.seqs["s"].state is DecodeState.RECEIVING and d.seqs["s"].length == p.header.end
    last = streamed.payloads[-1]
    d.import_kv(last.header, last.k, last.v)
    run_until(d, lambda: not d.seqs)
    tokens = [out.items[0].token_id] + [e.token_id for e in drain(stream)]
    assert_greedy_matches_reference(params, req.prompt_ids, tokens)

    d2 = DecodeEngine(new_runtime(runtimes[1].compiled, params), None, engine_options(max_batch_size=8))
    stream = reserve(d2, req)
    d2.import_kv(whole.header, whole.k, whole.v)
    run_until(d2, lambda: not d2.seqs)
    assert [out.items[0].token_id] + [e.token_id for e in drain(stream)] == tokens
    assert_no_leaks(d, d2)
    d2.runtime.close()


def test_the_last_tokens_of_a_streamed_prompt_get_their_own_forward(runtimes):
    sender = PieceSender()
    prefill(runtimes[0], sender, GenerationRequest("t", prompt(), GREEDY), kv_stream_tail=20)
    ranges = [(p.header.begin, p.header.end) for p in sender.payloads]
    assert ranges == [(0, 32), (32, 64), (64, 96), (96, 128), (128, 130), (130, PROMPT_LEN)]


def test_pieces_out_of_order_are_rejected_and_a_repeated_piece_is_imported_once(runtimes):
    req = GenerationRequest("o", prompt(), GREEDY)
    sender = PieceSender()
    prefill(runtimes[0], sender, req, kv_stream_tail=0)
    pieces = sender.payloads
    d = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8))
    reserve(d, req)
    free = runtimes[1].free_pages()
    with pytest.raises(PayloadError) as e:  # piece 2 before piece 1: nothing changes
        d.import_kv(pieces[1].header, pieces[1].k, pieces[1].v)
    assert e.value.code is ErrorCode.SHAPE_MISMATCH
    assert d.seqs["o"].state is DecodeState.RESERVED and runtimes[1].free_pages() == free
    d.import_kv(pieces[0].header, pieces[0].k, pieces[0].v)
    d.import_kv(pieces[0].header, pieces[0].k, pieces[0].v)  # a retry whose ack was lost: acked, not re-imported
    assert runtimes[1].sequence_length(d.seqs["o"].seq_id) == 32
    with pytest.raises(PayloadError) as e:  # the final piece (with token 1) before the middle ones
        d.import_kv(pieces[-1].header, pieces[-1].k, pieces[-1].v)
    assert e.value.code is ErrorCode.SHAPE_MISMATCH and d.seqs["o"].state is DecodeState.RECEIVING
    for p in pieces[1:]:
        d.import_kv(p.header, p.k, p.v)
    assert d.seqs["o"].state is DecodeState.DECODING
    run_until(d, lambda: not d.seqs)
    assert_no_leaks(d)


@pytest.mark.parametrize("cut", [1, 3])
def test_a_stream_cut_after_k_pieces_fails_cleanly_and_a_retry_succeeds(runtimes, params, cut):  # noqa: F811
    """Piece `cut` fails on its send and on the retry: the request fails with TRANSFER_FAILED before or after
    token 1; the decode side, holding pieces 0..cut-1, frees them when the router cancels; a new attempt then
    streams everything again and decodes the reference tokens; so does a local recompute of a cut stream."""
    req = GenerationRequest("c", prompt(), GREEDY)
    d = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8, prefix_cache=False))
    reserve(d, req)
    cut_sender = PieceSender(fail_at=frozenset({cut, cut + 1}))  # the piece, then its one retry
    out = prefill(runtimes[0], cut_sender, req, kv_stream_tail=0)
    result = out.items[-1]
    assert result.error is not None and result.error.kind is ErrorKind.TRANSFER_FAILED
    assert result.transfer_retries == 1 and len(cut_sender.payloads) == cut
    for p in cut_sender.payloads:  # what reached the decode worker before the cut
        d.import_kv(p.header, p.k, p.v)
    assert d.seqs["c"].state is DecodeState.RECEIVING
    assert d.cancel("c") and not d.seqs  # the router's cancel of the failed attempt frees the pieces
    assert_no_leaks(d)

    stream = reserve(d, req)  # the retry: a new attempt streams from the start
    sender = PieceSender()
    out = prefill(runtimes[0], sender, req, kv_stream_tail=0, prefix_cache=False)
    for p in sender.payloads:
        d.import_kv(p.header, p.k, p.v)
    run_until(d, lambda: not d.seqs)
    tokens = [out.items[0].token_id] + [e.token_id for e in drain(stream)]
    assert_greedy_matches_reference(params, req.prompt_ids, tokens)

    stream = reserve(d, GenerationRequest("r", req.token_ids, GREEDY))  # a recompute after a cut stream
    for p in cut_sender.payloads:
        d.import_kv(_renamed(p, "r").header, p.k, p.v)
    assert d.prefill_local("r").ok
    run_until(d, lambda: not d.seqs)
    events = drain(stream)
    assert not any(isinstance(e, RequestError) for e in events)
    assert [e.token_id for e in events] == tokens
    assert_no_leaks(d)


def _renamed(payload, request_id):
    import dataclasses

    from kvtransfer.payload import KVPayload

    return KVPayload(dataclasses.replace(payload.header, request_id=request_id), payload.k, payload.v)


def test_a_cancel_mid_stream_waits_for_the_transfer_thread_before_freeing_pages(runtimes):
    """The transfer thread may be reading the request's pages when the cancel comes: the sequence is freed only
    once it left, and nothing leaks."""
    gate, entered = threading.Event(), threading.Event()

    class SlowSender(PieceSender):
        def send(self, payload, target, timeout_s):
            entered.set()
            gate.wait(10)
            return super().send(payload, target, timeout_s)

    sender = SlowSender()
    p = PrefillEngine(runtimes[0], None, sender, engine_options(max_batch_size=8, kv_stream_tail=0), transfer_threads=1)
    out = Collect()
    assert p.submit(GenerationRequest("x", prompt(), GREEDY), "unused:1", out).ok
    run_until(p, lambda: entered.is_set())
    assert p.cancel("x")
    assert out.done.is_set() and out.items[-1].error.kind is ErrorKind.CANCELLED
    assert p.jobs["x"].seq_id in runtimes[0].sequence_ids()  # held while the send is in flight
    gate.set()
    run_until(p, lambda: not p.jobs)
    assert len(sender.payloads) == 1  # the queued pieces were dropped
    assert_no_leaks(p)


def test_host_kv_gather_equals_the_cache_s_own_kernel(runtimes):
    """`read_kv` on the CPU gathers from the page views at the cache's own token positions: bit-identical to
    TVM's `debug_get_kv` kernel, on a forked sequence (shared pages plus a copied tail page) and after popn."""
    import tvm

    from llama_relax.arrays import aligned_empty
    from llama_relax.runtime import _DEBUG_GET_KV

    rt = runtimes[0]
    rt.add_sequence(1)
    rt.prefill([1], [list(prompt()[:70])])
    rt.fork_sequence(1, 2, 37)
    rt.prefill([2], [list(prompt(seed=4)[:20])])
    rt.popn(2, 3)
    for seq, begin, end in [(1, 0, 70), (1, 17, 53), (2, 0, 54), (2, 30, 54)]:
        k, v = rt.read_kv(seq, begin, end)
        want = [aligned_empty(rt.kv_shape(end - begin), rt.compiled.dtype) for _ in range(2)]
        _DEBUG_GET_KV(rt.kv_cache, seq, begin, end, *(tvm.runtime.from_dlpack(a) for a in want))
        assert k.tobytes() == want[0].tobytes() and v.tobytes() == want[1].tobytes()
    positions = rt.kv_positions(2, 0, 54)
    assert positions.shape == (54,) and len(set(positions.tolist())) == 54
    assert set((positions[:32] // 16).tolist()) <= set((rt.kv_positions(1, 0, 32) // 16).tolist())  # shared
    for s in (1, 2):
        rt.remove_sequence(s)


def test_each_piece_renews_the_kv_lease_and_a_stalled_stream_expires(runtimes):
    """A long prompt's pieces may take longer than the lease in all: the lease runs from the last piece. A stream
    that stops coming expires (TRANSFER_FAILED) and frees the pieces it brought. The engine's lease clock is the
    test's own, so the outcome does not depend on how fast this machine runs."""
    req = GenerationRequest("l", prompt(), GREEDY)
    sender = PieceSender()
    prefill(runtimes[0], sender, req, kv_stream_tail=0)
    clock = FakeClock()
    d = DecodeEngine(runtimes[1], None, engine_options(max_batch_size=8, kv_lease_s=0.4), clock=clock)
    stream = reserve(d, req)
    for p in sender.payloads[:3]:
        clock.now += 0.25
        d.import_kv(p.header, p.k, p.v)
        clock.now += 0.25  # past the lease from admission, inside it from the last piece
        d.tick()
        assert d.seqs["l"].state is DecodeState.RECEIVING  # 0.5 s after admission or the piece before
    clock.now += 0.6
    run_until(d, lambda: not d.seqs)
    (error,) = drain(stream)
    assert error.kind is ErrorKind.TRANSFER_FAILED and d.load().lease_expired == 1
    assert_no_leaks(d)
