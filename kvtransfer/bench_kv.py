"""`pdserve bench-kv`: move the KV of an N-token prefill between two processes over the real gRPC transport on
127.0.0.1, verify that decoding after the import gives the same logits as decoding in place, and report export /
transfer / import times next to a memcpy of the same bytes measured in the same run.

The sender pushes the same KV `--repeats` times over one channel, as a prefill worker does over its cached
channel: `transfer_ms` is the median wire time (send to ack, minus the receiver's import) of the warm pushes and
`cold_transfer_ms` the first one, which also opens the TCP connection and HTTP/2 session. The receiver imports
every push into its own sequence (the warm ones are removed again at once) and decodes from the last. With
`--bare` (default) it also reports `bare_grpc_mib_s`: the same bytes through a bare gRPC stream with the same
options between two processes (`kvtransfer.bench_transport`), i.e. what Python gRPC itself allows here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20


def memcpy_mib_s(nbytes: int, repeats: int = 5) -> float:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / MIB


def run_bench_kv(args: argparse.Namespace) -> int:
    from kvtransfer.grpc_transport import GrpcKVReceiver
    from kvtransfer.peer import SenderJob, spawn_sender
    from kvtransfer.runtime_io import RuntimeImporter, receiver_checks
    from llama_relax.models import default_model_path, open_model
    from llama_relax.runtime import KVCacheConfig

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    cache_dir = args.cache_dir
    model_path = args.model or default_model_path(cache_dir)
    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=args.tokens + 512, prefill_chunk_size=512)
    model = open_model(model_path, cache_dir=cache_dir, kv=kv, quiet=args.json)
    rt = model.runtime
    if args.tokens >= model.config.context_window_size:
        raise ValueError(f"--tokens must be below the context window ({model.config.context_window_size})")
    seq, final_id = 1000, "bench"

    def resolve(request_id: str) -> int:  # "bench" -> the verified sequence; "bench#i" -> a warm-up repeat
        return seq if request_id == final_id else 2000 + int(request_id.rsplit("#", 1)[1])

    importer = RuntimeImporter(rt, resolve)

    def sink(header, k, v) -> None:
        importer(header, k, v)
        if header.request_id != final_id:
            rt.remove_sequence(resolve(header.request_id))  # a warm repeat: give its pages back at once

    receiver = GrpcKVReceiver(sink, on_orphaned=importer.on_orphaned, **receiver_checks(rt))
    address = receiver.start()
    try:
        prompt = tuple(int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, args.tokens))
        job = SenderJob(
            model=str(model_path),
            cache_dir=str(cache_dir),
            prompt=prompt,
            seq_id=7,
            address=address,
            request_id=final_id,
            decode_tokens=(1,),
            kv_total_tokens=args.tokens + 512,
            repeats=max(1, args.repeats),
        )
        log(f"sender process: prefill {args.tokens} tokens, export, push {job.repeats}x to {address} ...")
        proc, conn = spawn_sender(job)
        report = conn.recv() if conn.poll(1800) else None
        proc.join(30)
        if report is None or not report.ok:
            raise RuntimeError(f"sender failed: {report.error if report else 'no report'}")
        for s in (1, 2):
            rt.add_sequence(s)
        rt.prefill([1, 2], [[5] * 23, [7] * 11])  # the same batch shape the sender decoded in
        got = rt.decode([1, seq, 2], [9, 1, 9])[1]
        verified = bool(np.array_equal(got, report.logits[0]))
    finally:
        receiver.stop()
        model.close()
    wire = [max(t - i, 1e-9) for t, i in zip(report.repeat_transfer_s, report.repeat_import_s, strict=True)]
    warm = wire[1:] or wire
    wire_s = statistics.median(warm)
    import_s = statistics.median(report.repeat_import_s[1:] or report.repeat_import_s)
    result = {
        "verified": verified,
        "tokens": args.tokens,
        "bytes": report.bytes,
        "repeats": len(wire),
        "export_ms": 1000 * report.export_s,
        "transfer_ms": 1000 * wire_s,
        "cold_transfer_ms": 1000 * wire[0],
        "import_ms": 1000 * import_s,
        "end_to_end_ms": 1000 * (report.export_s + wire_s + import_s),
        "transfer_mib_s": report.bytes / wire_s / MIB,
        "memcpy_mib_s": memcpy_mib_s(report.bytes),
    }
    result["transfer_vs_memcpy"] = result["transfer_mib_s"] / result["memcpy_mib_s"]
    if args.bare:
        from kvtransfer.bench_transport import measure_two_process

        log("bare gRPC stream of the same bytes between two processes ...")
        bare = measure_two_process(report.bytes, repeats=9)["bare_grpc"]["mib_s"]
        result["bare_grpc_mib_s"] = bare
        result["bare_grpc_vs_memcpy"] = bare / result["memcpy_mib_s"]
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20s}: {v:.3f}" if isinstance(v, float) else f"{k:>20s}: {v}")
    return 0 if verified else 1


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=8, help="pushes of the same KV; the first is the cold one")
    p.add_argument(
        "--bare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a bare gRPC stream of the same bytes (the Python gRPC floor)",
    )
    p.add_argument("--json", action="store_true")
