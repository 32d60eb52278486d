"""kvtransfer.grpc_transport over real gRPC on 127.0.0.1, with a recording fake sink (no model)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender, decode_data_chunk, encode_data_chunk
from kvtransfer.payload import (
    ErrorCode,
    KVHeader,
    KVPayload,
    PayloadError,
    expect_shape,
    iter_chunks,
    make_payload,
)
from kvtransfer.transport import CancelResult
from protos import kvtransfer_pb2 as pb
from protos import kvtransfer_pb2_grpc as pbg

FP = "fp-test"
SHAPE = (4, 64, 2, 32)  # [layers, tokens, kv_heads, head_dim]: 64 KiB per float32 array


class RecordingSink:
    """Records every import; optionally blocks on `gate` or raises `error`."""

    def __init__(self, error: Exception | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[KVHeader, np.ndarray, np.ndarray]] = []
        self.entered = threading.Event()
        self.error, self.gate = error, gate
        self._lock = threading.Lock()

    def __call__(self, header: KVHeader, k: np.ndarray, v: np.ndarray) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.error is not None:
            raise self.error
        with self._lock:
            self.calls.append((header, np.array(k), np.array(v)))


def _payload(shape=SHAPE, dtype=np.float32, fp=FP, request_id="req", seed=0, chunk_bytes=16 << 10) -> KVPayload:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    v = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return make_payload(k, v, fp, 10, request_id, chunk_bytes=chunk_bytes)


@pytest.fixture
def sink():
    return RecordingSink()


@pytest.fixture
def receiver(sink):
    r = GrpcKVReceiver(sink, expected_fingerprint=FP, expected_dtype="float32", shape_check=expect_shape(4, 2, 32))
    r.start()
    yield r
    r.stop(None)


@pytest.fixture
def sender():
    s = GrpcKVSender()
    yield s
    s.close()


def _raw_push(address: str, messages: Iterator[pb.KVChunk], timeout: float = 10.0) -> pb.KVAck:
    """A minimal client on the generated stub, for sending hand-made (faulty) streams."""
    with grpc.insecure_channel(address) as ch:
        return pbg.KVTransferStub(ch).Push(messages, timeout=timeout)


def _raw_messages(p: KVPayload, corrupt=None, stop_after=None, extra=False, commit=True, after_commit=False):
    yield pb.KVChunk(transfer_id="raw", header=p.header.to_bytes())
    for i, c in enumerate(iter_chunks(p)):
        if stop_after is not None and i == stop_after:
            return
        data = bytearray(c)
        if i == corrupt:
            data[len(data) // 2] ^= 0x40
        yield pb.KVChunk(index=i, data=bytes(data))
    if extra:
        yield pb.KVChunk(index=p.header.num_chunks, data=b"x")
    if commit:
        yield pb.KVChunk(commit=True)
    if after_commit:
        yield pb.KVChunk(index=p.header.num_chunks, data=b"x")


def test_wire_codec_matches_protobuf():
    data = memoryview(b"\x01\x02" * 300)
    for index in (1, 127, 128, 70000):
        enc = encode_data_chunk(index, data)
        assert enc == pb.KVChunk(index=index, data=bytes(data)).SerializeToString()
        i, d = decode_data_chunk(enc)
        assert i == index and bytes(d) == bytes(data)
    i, d = decode_data_chunk(pb.KVChunk(index=0, data=b"abc").SerializeToString())  # index 0 is omitted
    assert (i, bytes(d)) == (0, b"abc")
    i, d = decode_data_chunk(b"\x22\x01z\x18\x05")  # unusual field order: protobuf fallback
    assert (i, bytes(d)) == (5, b"z")


def test_receiver_binds_loopback_only(sink):
    with pytest.raises(ValueError):
        GrpcKVReceiver(sink, host="0.0.0.0")


def test_large_payload_bit_identical(sender, sink):
    p = _payload(shape=(32, 384, 8, 64), dtype=np.float16, chunk_bytes=1 << 20)  # 2 x 12 MiB
    r = GrpcKVReceiver(sink, expected_fingerprint=FP, expected_dtype="float16")
    address = r.start()
    try:
        assert address.startswith("127.0.0.1:")
        res = sender.send(p, address, timeout_s=60)
    finally:
        r.stop(None)
    assert res.ok and res.error is None, res
    assert res.nbytes == p.header.total_bytes == 2 * 12 * 2**20
    assert res.transfer_s > 0 and res.import_s > 0
    [(header, k, v)] = sink.calls
    assert header == p.header
    assert k.tobytes() == p.k.tobytes() and v.tobytes() == p.v.tobytes()


def test_small_payload_and_ack_fields(receiver, sender, sink):
    p = _payload()
    res = sender.send(p, receiver.address, timeout_s=10)
    assert res.ok and res.nbytes == p.header.total_bytes
    assert np.array_equal(sink.calls[0][1], p.k) and np.array_equal(sink.calls[0][2], p.v)


def test_checksum_mismatch_not_imported(receiver, sink):
    p = _payload()
    ack = _raw_push(receiver.address, _raw_messages(p, corrupt=3))
    assert not ack.ok and ack.error_code == "CHECKSUM_MISMATCH" and ack.transfer_id == "raw"
    assert ack.bytes_received == 3 * (16 << 10)
    assert sink.calls == [] and not sink.entered.is_set()


def test_truncated_stream(receiver, sink):
    p = _payload()
    ack = _raw_push(receiver.address, _raw_messages(p, stop_after=5))
    assert not ack.ok and ack.error_code == "TRUNCATED" and "5 of 8" in ack.message
    ack = _raw_push(receiver.address, iter([]))
    assert ack.error_code == "TRUNCATED"
    ack = _raw_push(receiver.address, _raw_messages(p, commit=False))  # all data, no commit
    assert ack.error_code == "TRUNCATED" and "commit" in ack.message
    assert sink.calls == []


def test_extra_data_and_malformed_messages(receiver, sink):
    p = _payload()
    assert _raw_push(receiver.address, _raw_messages(p, extra=True)).error_code == "MALFORMED"
    assert _raw_push(receiver.address, _raw_messages(p, after_commit=True)).error_code == "MALFORMED"
    assert _raw_push(receiver.address, _raw_messages(p)).ok  # the well-formed stream, for contrast
    sink.calls.clear()
    assert _raw_push(receiver.address, iter([pb.KVChunk(header=b"\x93\x01")])).error_code == "MALFORMED"
    assert _raw_push(receiver.address, iter([pb.KVChunk(index=0, data=b"x")])).error_code == "MALFORMED"
    assert sink.calls == []


@pytest.mark.parametrize(
    ("payload_kw", "code"),
    [
        ({"fp": "other-model"}, "FINGERPRINT_MISMATCH"),
        ({"dtype": np.float16}, "DTYPE_MISMATCH"),
        ({"shape": (4, 64, 4, 32)}, "SHAPE_MISMATCH"),
    ],
)
def test_header_rejected_before_any_data(receiver, sink, payload_kw, code):
    """The raw client sends only the header and then waits: the ack must come without any data sent."""
    p = _payload(**payload_kw)
    release = threading.Event()

    def header_then_wait():
        yield pb.KVChunk(transfer_id="t", header=p.header.to_bytes())
        release.wait(10)

    try:
        ack = _raw_push(receiver.address, header_then_wait(), timeout=5)
    finally:
        release.set()
    assert not ack.ok and ack.error_code == code and ack.bytes_received == 0
    assert sink.calls == []


def test_sender_reports_rejection(receiver, sender, sink):
    res = sender.send(_payload(fp="other-model"), receiver.address, timeout_s=10)
    assert not res.ok and res.error is ErrorCode.FINGERPRINT_MISMATCH and res.nbytes == 0
    assert "other-model" in res.message
    assert sink.calls == []


def test_cancel_mid_transfer_by_request_id(receiver, sender, sink):
    p = _payload(request_id="to-cancel")
    sender.on_chunk = lambda rid, i: sender.cancel(rid) if i == 3 else None
    res = sender.send(p, receiver.address, timeout_s=10)
    assert not res.ok and res.error is ErrorCode.CANCELLED
    assert res.nbytes < p.header.total_bytes
    time.sleep(0.3)  # let the receiver observe the abort
    assert sink.calls == [] and not sink.entered.is_set()
    assert sender.cancel("to-cancel") is CancelResult.NOT_FOUND
    sender.on_chunk = None
    assert sender.send(p, receiver.address, timeout_s=10).ok  # the sender is still usable


def test_cancel_by_event(receiver, sender, sink):
    cancel = threading.Event()
    sender.on_chunk = lambda rid, i: cancel.set() if i == 2 else None
    res = sender.send(_payload(), receiver.address, timeout_s=10, cancel=cancel)
    assert res.error is ErrorCode.CANCELLED
    time.sleep(0.3)
    assert sink.calls == []


def test_client_disconnect_before_commit_imports_nothing(receiver, sink):
    """All chunks arrive, then the client cancels instead of committing: nothing is imported."""
    p = _payload()
    release = threading.Event()

    def all_then_wait():
        yield from _raw_messages(p, commit=False)
        release.wait(10)

    with grpc.insecure_channel(receiver.address) as ch:
        fut = pbg.KVTransferStub(ch).Push.future(all_then_wait(), timeout=10)
        time.sleep(0.3)
        fut.cancel()
        release.set()
    time.sleep(0.3)
    assert sink.calls == [] and not sink.entered.is_set()


def test_concurrent_senders_into_one_receiver(receiver, sender, sink):
    payloads = [_payload(request_id=f"r{i}", seed=i) for i in range(4)]
    results = [None] * len(payloads)

    def run(i):
        results[i] = sender.send(payloads[i], receiver.address, timeout_s=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.ok for r in results), results
    got = {h.request_id: (k, v) for h, k, v in sink.calls}
    for p in payloads:
        k, v = got[p.header.request_id]
        assert np.array_equal(k, p.k) and np.array_equal(v, p.v)


def test_busy_when_all_slots_taken(sender):
    gate = threading.Event()
    sink = RecordingSink(gate=gate)
    r = GrpcKVReceiver(sink, max_concurrent=1)
    address = r.start()
    first: list = []
    t = threading.Thread(target=lambda: first.append(sender.send(_payload(request_id="a"), address, 10)))
    try:
        t.start()
        assert sink.entered.wait(5)
        res = sender.send(_payload(request_id="b"), address, timeout_s=5)
        assert not res.ok and res.error is ErrorCode.BUSY
    finally:
        gate.set()
        t.join()
        r.stop(None)
    assert first[0].ok and [h.request_id for h, _, _ in sink.calls] == ["a"]


def test_sink_error_becomes_import_failed(sender):
    sink = RecordingSink(error=MemoryError("3 pages needed, 1 free"))
    r = GrpcKVReceiver(sink)
    address = r.start()
    try:
        res = sender.send(_payload(), address, timeout_s=10)
    finally:
        r.stop(None)
    assert not res.ok and res.error is ErrorCode.IMPORT_FAILED
    assert "MemoryError" in res.message and "3 pages needed, 1 free" in res.message


def test_sink_payload_error_keeps_its_code(sender):
    sink = RecordingSink(error=PayloadError(ErrorCode.SHAPE_MISMATCH, "payload starts at 10; sequence holds 4"))
    r = GrpcKVReceiver(sink)
    address = r.start()
    try:
        res = sender.send(_payload(), address, timeout_s=10)
    finally:
        r.stop(None)
    assert res.error is ErrorCode.SHAPE_MISMATCH and res.message == "payload starts at 10; sequence holds 4"


def test_receiver_internal_error_is_an_ack(sender, sink):
    r = GrpcKVReceiver(sink, shape_check=lambda h: 1 // 0)
    address = r.start()
    try:
        res = sender.send(_payload(), address, timeout_s=10)
    finally:
        r.stop(None)
    assert res.error is ErrorCode.UNAVAILABLE and "ZeroDivisionError" in res.message
    assert sink.calls == []


def test_timeout_during_import_reports_orphan(sender):
    gate = threading.Event()
    orphans: list[KVHeader] = []
    sink = RecordingSink(gate=gate)
    r = GrpcKVReceiver(sink, on_orphaned=orphans.append)
    address = r.start()
    try:
        res = sender.send(_payload(request_id="slow"), address, timeout_s=1.0)
        assert not res.ok and res.error is ErrorCode.TIMEOUT and sink.entered.is_set()
        time.sleep(1.0)  # the receiver's deadline (ms after the sender's) passes while the sink still runs
        gate.set()
        deadline = time.monotonic() + 5
        while not orphans and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gate.set()
        r.stop(None)
    assert [h.request_id for h in orphans] == ["slow"]


def test_unreachable_target_is_a_result_not_an_exception(sender):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = sender.send(_payload(), f"127.0.0.1:{port}", timeout_s=5)
    assert not res.ok and res.error is ErrorCode.UNAVAILABLE


def test_closed_sender_fails_cleanly(receiver):
    s = GrpcKVSender()
    s.close()
    res = s.send(_payload(), receiver.address, timeout_s=5)
    assert not res.ok and res.error is ErrorCode.CANCELLED


def test_nccl_transport_import_safe(sink):
    from kvtransfer import nccl_transport as nt

    uid = tuple(range(-64, 64))
    assert nt.unique_id_from_bytes(nt.unique_id_to_bytes(uid)) == uid
    if not nt.nccl_available():
        with pytest.raises(RuntimeError, match=r"NCCL transport needs CUDA \+ cupy"):
            nt.NcclKVSender()
        with pytest.raises(RuntimeError, match=r"NCCL transport needs CUDA \+ cupy"):
            nt.NcclKVReceiver(sink)


def test_bench_helpers_smoke():
    from kvtransfer.bench_transport import measure_memcpy, measure_two_process

    g = measure_two_process(1 << 20, chunk_bytes=256 << 10, repeats=1)
    m = measure_memcpy(1 << 20, repeats=1)
    assert g["arrived_intact"] and g["nbytes"] == m["nbytes"] > 0
    assert g["transport"]["mib_s"] > 0 and g["bare_grpc"]["mib_s"] > 0
