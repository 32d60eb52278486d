"""KV transport throughput on this machine: gRPC over loopback (sender + receiver in this process) vs a memcpy.

Used by `pdserve bench-kv`; `python -m kvtransfer.bench_transport [MiB]` prints the same as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.payload import DEFAULT_CHUNK_BYTES, KVHeader, make_payload

_FP = "bench-fingerprint"


def _kv_arrays(nbytes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float16 K and V [layers=32, n, kv_heads=8, head_dim=64] totalling ~nbytes (at least one token)."""
    per_token = 32 * 8 * 64 * 2  # bytes of one token's K (or V)
    n = max(1, nbytes // (2 * per_token))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((32, n, 8, 64), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((32, n, 8, 64), dtype=np.float32).astype(np.float16)
    return k, v


def measure_grpc_throughput(nbytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, repeats: int = 7) -> dict:
    """Push ~nbytes of K+V through a `GrpcKVSender` into a `GrpcKVReceiver` on 127.0.0.1, `repeats` times.

    `mib_s` is the median over sends of a prebuilt payload (wire + receiver verification + ack); `e2e_mib_s`
    adds `make_payload` (the sender's CRC pass). The last transfer is checked to arrive bit-identical.
    """
    k, v = _kv_arrays(nbytes)
    got: list[tuple[np.ndarray, np.ndarray]] = []

    def sink(header: KVHeader, rk: np.ndarray, rv: np.ndarray) -> None:
        got[:] = [(rk, rv)]

    receiver = GrpcKVReceiver(sink, expected_fingerprint=_FP, max_concurrent=1)
    sender = GrpcKVSender()
    try:
        address = receiver.start()
        t0 = time.perf_counter()
        payload = make_payload(k, v, _FP, 0, "bench", chunk_bytes=chunk_bytes)
        make_s = time.perf_counter() - t0
        total = payload.header.total_bytes
        warm = sender.send(payload, address, timeout_s=60.0)
        if not warm.ok:
            raise RuntimeError(f"bench transfer failed: {warm.error} {warm.message}")
        times = []
        for _ in range(repeats):
            res = sender.send(payload, address, timeout_s=60.0)
            if not res.ok:
                raise RuntimeError(f"bench transfer failed: {res.error} {res.message}")
            times.append(res.transfer_s)
        identical = bool(np.array_equal(got[0][0], k) and np.array_equal(got[0][1], v))
    finally:
        sender.close()
        receiver.stop(None)
    med = statistics.median(times)
    return {
        "nbytes": total,
        "chunk_bytes": chunk_bytes,
        "repeats": repeats,
        "mib_s": total / med / 2**20,
        "best_mib_s": total / min(times) / 2**20,
        "make_payload_s": make_s,
        "e2e_mib_s": total / (med + make_s) / 2**20,
        "bit_identical": identical,
    }


def measure_memcpy(nbytes: int, repeats: int = 7) -> dict:
    """numpy copy of the same ~nbytes (K and V into preallocated arrays): the in-process upper bound."""
    k, v = _kv_arrays(nbytes)
    dk, dv = np.empty_like(k), np.empty_like(v)
    np.copyto(dk, k), np.copyto(dv, v)  # fault the destination pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dk, k)
        np.copyto(dv, v)
        times.append(time.perf_counter() - t0)
    total = k.nbytes + v.nbytes
    return {
        "nbytes": total,
        "repeats": repeats,
        "mib_s": total / statistics.median(times) / 2**20,
        "best_mib_s": total / min(times) / 2**20,
    }


def bench_kv(nbytes: int = 24 << 20, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Both measurements plus the ratio of their medians (gRPC / memcpy)."""
    grpc_r = measure_grpc_throughput(nbytes, chunk_bytes)
    copy_r = measure_memcpy(nbytes)
    return {"grpc": grpc_r, "memcpy": copy_r, "ratio": grpc_r["mib_s"] / copy_r["mib_s"]}


if __name__ == "__main__":
    mib = float(sys.argv[1]) if len(sys.argv) > 1 else 24.0
    cb = int(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_CHUNK_BYTES
    print(json.dumps(bench_kv(int(mib * 2**20), cb), indent=2))
