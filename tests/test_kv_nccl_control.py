"""The NCCL transport's control plane on CPU: real gRPC servers and streams, with a host-memory bulk backend in
place of NCCL (tests/kv_host_backend.py). Covers rendezvous and session reuse, the ready/commit handshake, header
rejection before any receive is posted, checksum failure, cancel between ready and send (both sides abort the
session, nothing imported, the next push rebuilds it), the host `Push` served by the same receiver, routing,
and the "wsum64" checksum against a plain-Python reference."""

from __future__ import annotations

import time

import numpy as np
import pytest
from kv_host_backend import HostBackend

from kvtransfer.grpc_transport import GrpcKVSender
from kvtransfer.nccl_transport import NcclKVReceiver, NcclKVSender, RoutedSender, make_device_payload, split_target
from kvtransfer.payload import HOST_CHECKSUMS, ErrorCode, make_payload, wsum64

FP = "fp-nccl"


def kv(seed: int = 0, n: int = 37) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((3, n, 2, 16), dtype=np.float32), rng.standard_normal((3, n, 2, 16), dtype=np.float32))


@pytest.fixture
def pair():
    backend = HostBackend()
    got: list = []
    rx = NcclKVReceiver(
        lambda h, k, v: got.append((h, np.array(k), np.array(v))),
        backend=backend,
        expected_fingerprint=FP,
        expected_dtype="float32",
    )
    rx.start()
    tx = NcclKVSender(backend)
    yield backend, rx, tx, got
    tx.close()
    rx.stop(None)


def test_push_delivers_and_reuses_the_session(pair):
    backend, rx, tx, got = pair
    for i in range(3):
        k, v = kv(i)
        p = make_device_payload(backend, k, v, FP, 0, f"r{i}", chunk_bytes=1000)
        res = tx.send(p, rx.advertised, timeout_s=30)
        assert res.ok, res.message
        assert res.nbytes == k.nbytes + v.nbytes
        h, gk, gv = got[-1]
        assert h.request_id == f"r{i}" and np.array_equal(gk, k) and np.array_equal(gv, v)
    assert len(backend.links) == 2 and backend.sends == 3  # one rendezvous, then the session is reused
    assert all(link.closed is None for link in backend.links)


def test_host_payload_is_restaged_with_device_checksums(pair):
    _, rx, tx, got = pair
    k, v = kv(5)
    res = tx.send(make_payload(k, v, FP, 4, "host"), rx.address, timeout_s=30)
    assert res.ok, res.message
    h, gk, gv = got[-1]
    assert h.checksum == "wsum64" and h.begin == 4 and np.array_equal(gk, k) and np.array_equal(gv, v)


def test_rejected_header_keeps_the_session_and_posts_nothing(pair):
    backend, rx, tx, got = pair
    k, v = kv()
    posted: list[int] = []
    backend.on_post_recv = lambda: posted.append(1)
    res = tx.send(make_device_payload(backend, k, v, "other-model", 0, "bad"), rx.address, timeout_s=30)
    assert not res.ok and res.error == ErrorCode.FINGERPRINT_MISMATCH and res.nbytes == 0
    res = tx.send(
        make_device_payload(backend, k.astype(np.float16), v.astype(np.float16), FP, 0, "f16"), rx.address, timeout_s=30
    )
    assert res.error == ErrorCode.DTYPE_MISMATCH
    assert not posted and not got and backend.sends == 0
    assert all(link.closed is None for link in backend.links)
    assert tx.send(make_device_payload(backend, k, v, FP, 0, "good"), rx.address, timeout_s=30).ok
    assert len(backend.links) == 2


def test_corrupted_bytes_are_rejected_before_the_sink(pair):
    backend, rx, tx, got = pair
    k, v = kv()
    backend.corrupt_next = True
    res = tx.send(make_device_payload(backend, k, v, FP, 0, "c", chunk_bytes=512), rx.address, timeout_s=30)
    assert not res.ok and res.error == ErrorCode.CHECKSUM_MISMATCH and "wsum64" in res.message
    assert not got


def test_cancel_after_ready_imports_nothing_and_rebuilds_the_session(pair):
    backend, rx, tx, got = pair
    k, v = kv()
    backend.on_post_recv = lambda: tx.cancel("x")  # the receiver is about to answer ready
    res = tx.send(make_device_payload(backend, k, v, FP, 0, "x"), rx.address, timeout_s=30)
    assert not res.ok and res.error == ErrorCode.CANCELLED
    assert not got and backend.sends == 0
    deadline = time.monotonic() + 10  # the receiver notices the missing commit on its own thread
    while sorted(link.closed or "" for link in backend.links) != ["abort", "abort"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(link.closed or "" for link in backend.links) == ["abort", "abort"]  # both ends dropped it
    backend.on_post_recv = None
    assert tx.send(make_device_payload(backend, k, v, FP, 0, "y"), rx.address, timeout_s=30).ok
    assert len(backend.links) == 4 and got[-1][0].request_id == "y"
    assert tx.cancel("nobody").value == "NOT_FOUND"


def test_receiver_also_serves_the_host_push_and_routing(pair):
    backend, rx, tx, got = pair
    k, v = kv(2)
    grpc_tx = GrpcKVSender()
    routed = RoutedSender(grpc_tx, tx)
    try:
        assert routed.send(make_payload(k, v, FP, 0, "plain"), rx.address, timeout_s=30).ok  # host Push
        assert backend.sends == 0 and got[-1][0].checksum == "xxh3_64"
        assert routed.send(make_payload(k, v, FP, 0, "gpu"), rx.advertised, timeout_s=30).ok  # nccl://
        assert backend.sends == 1 and got[-1][0].checksum == "wsum64"
        # without an NCCL sender (a CPU prefill worker) an nccl:// target falls back to the host Push
        cpu_only = RoutedSender(GrpcKVSender())
        res = cpu_only.send(make_device_payload(backend, k, v, FP, 0, "cpu"), rx.advertised, timeout_s=30)
        assert res.ok and got[-1][0].checksum == "xxh3_64" and backend.sends == 1
        cpu_only.close()
    finally:
        grpc_tx.close()
    assert split_target(rx.advertised) == (True, rx.address) and split_target("h:1") == (False, "h:1")


def test_unknown_session_and_unreachable_receiver():
    backend = HostBackend()
    tx = NcclKVSender(backend, connect_timeout_s=2)
    k, v = kv()
    res = tx.send(make_device_payload(backend, k, v, FP, 0, "r"), "127.0.0.1:1", timeout_s=2)
    assert not res.ok and res.error in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
    tx.close()


def test_wsum64_matches_a_python_reference_and_catches_swaps():
    data = np.random.default_rng(3).integers(0, 256, 8 * 50 + 3, dtype=np.uint8)
    padded = bytes(data) + b"\0" * 5
    words = [int.from_bytes(padded[i : i + 8], "little") for i in range(0, len(padded), 8)]
    want = sum((i + 1) * w for i, w in enumerate(words)) % (1 << 64)
    assert int(wsum64(np, data)) == want == HOST_CHECKSUMS["wsum64"](memoryview(data))
    swapped = data.copy()
    swapped[:8], swapped[8:16] = data[8:16], data[:8]
    assert int(wsum64(np, swapped)) != want
