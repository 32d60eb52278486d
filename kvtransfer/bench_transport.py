"""KV transport throughput on this machine, model-free: the gRPC transport between two processes on 127.0.0.1,
next to a bare gRPC stream of the same bytes (the floor that Python gRPC itself sets) and a memcpy.

`python -m kvtransfer.bench_transport [MiB] [chunk KiB]` prints JSON. Three numbers, one run:
- `transport`: `GrpcKVSender.send` of a prebuilt payload into a `GrpcKVReceiver` in a child process whose sink
  copies K and V into preallocated arrays (what an import does); the median over `repeats` warm transfers.
- `bare_grpc`: the same bytes, as prebuilt 1-chunk messages, through a client stream into a handler that only
  drains it, with the transport's channel options: no header, checksums, assembly or sink.
- `memcpy`: numpy copy of the same bytes into warm, preallocated arrays (the in-process upper bound).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent import futures

import numpy as np

from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender, channel_options
from kvtransfer.payload import DEFAULT_CHUNK_BYTES, KVHeader, iter_chunks, make_payload

_FP = "bench-fingerprint"
MIB = 1 << 20
_DRAIN_METHOD = "/pdserve.bench.Drain/Push"


def _kv_arrays(nbytes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float16 K and V [layers=32, n, kv_heads=8, head_dim=64] totalling ~nbytes (at least one token)."""
    per_token = 32 * 8 * 64 * 2  # bytes of one token's K (or V)
    n = max(1, nbytes // (2 * per_token))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((32, n, 8, 64), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((32, n, 8, 64), dtype=np.float32).astype(np.float16)
    return k, v


def _serve(conn, nbytes: int) -> None:
    """Child process: a `GrpcKVReceiver` whose sink copies into warm arrays, and a bare draining gRPC server."""
    import grpc

    k0, _ = _kv_arrays(nbytes)
    dst_k, dst_v = np.zeros_like(k0), np.zeros_like(k0)
    sums: list[float] = []

    def sink(header: KVHeader, k: np.ndarray, v: np.ndarray) -> None:
        np.copyto(dst_k, k)
        np.copyto(dst_v, v)
        sums[:] = [float(dst_k[0, -1].astype(np.float32).sum() + dst_v[-1, 0].astype(np.float32).sum())]

    receiver = GrpcKVReceiver(sink, expected_fingerprint=_FP, max_concurrent=1)
    address = receiver.start()

    def drain(requests, context) -> bytes:
        n = 0
        for m in requests:
            n += len(m)
        return n.to_bytes(8, "little")

    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=channel_options())
    handler = grpc.stream_unary_rpc_method_handler(drain)
    bare.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pdserve.bench.Drain", {"Push": handler}),))
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    conn.send((address, f"127.0.0.1:{bare_port}"))
    conn.recv()  # stop
    conn.send(sums)
    bare.stop(None).wait()
    receiver.stop(None)


def _median_mib_s(nbytes: int, times: list[float]) -> dict:
    return {"mib_s": nbytes / statistics.median(times) / MIB, "best_mib_s": nbytes / min(times) / MIB}


def measure_two_process(nbytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, repeats: int = 15) -> dict:
    """`transport` and `bare_grpc` medians over `repeats` warm transfers (after 3 warm-up ones each)."""
    import grpc

    k, v = _kv_arrays(nbytes)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, nbytes), daemon=True)
    proc.start()
    sender = GrpcKVSender()
    try:
        if not parent.poll(120):
            raise RuntimeError("bench receiver process did not start")
        address, bare_address = parent.recv()
        t0 = time.perf_counter()
        payload = make_payload(k, v, _FP, 0, "bench", chunk_bytes=chunk_bytes)
        make_s = time.perf_counter() - t0
        total = payload.header.total_bytes
        times = []
        for i in range(3 + repeats):
            res = sender.send(payload, address, timeout_s=60.0)
            if not res.ok:
                raise RuntimeError(f"bench transfer failed: {res.error} {res.message}")
            if i >= 3:
                times.append(res.transfer_s - res.import_s)
        messages = [bytes(c) for c in iter_chunks(payload)]
        channel = grpc.insecure_channel(bare_address, options=channel_options())
        push = channel.stream_unary(_DRAIN_METHOD)
        bare_times = []
        for i in range(3 + repeats):
            t0 = time.perf_counter()
            got = int.from_bytes(push(iter(messages), timeout=60.0), "little")
            if i >= 3:
                bare_times.append(time.perf_counter() - t0)
            if got != total:
                raise RuntimeError(f"bare stream delivered {got} of {total} bytes")
        channel.close()
        parent.send("stop")
        sums = parent.recv() if parent.poll(60) else []
    finally:
        sender.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    want = float(k[0, -1].astype(np.float32).sum() + v[-1, 0].astype(np.float32).sum())
    return {
        "nbytes": total,
        "chunk_bytes": chunk_bytes,
        "repeats": repeats,
        "transport": _median_mib_s(total, times),
        "bare_grpc": _median_mib_s(total, bare_times),
        "make_payload_ms": 1000 * make_s,
        "arrived_intact": sums == [want],
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
    return {"nbytes": k.nbytes + v.nbytes, "repeats": repeats, **_median_mib_s(k.nbytes + v.nbytes, times)}


def bench_transport(nbytes: int = 24 << 20, chunk_bytes: int = DEFAULT_CHUNK_BYTES, repeats: int = 15) -> dict:
    """All three measurements plus the ratios of their medians to the memcpy."""
    r = measure_two_process(nbytes, chunk_bytes, repeats)
    r["memcpy"] = measure_memcpy(nbytes)
    r["transport_vs_memcpy"] = r["transport"]["mib_s"] / r["memcpy"]["mib_s"]
    r["bare_grpc_vs_memcpy"] = r["bare_grpc"]["mib_s"] / r["memcpy"]["mib_s"]
    return r


if __name__ == "__main__":
    mib = float(sys.argv[1]) if len(sys.argv) > 1 else 24.0
    kib = int(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_CHUNK_BYTES >> 10
    print(json.dumps(bench_transport(int(mib * MIB), kib << 10), indent=2))
