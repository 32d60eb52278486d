"""`pdserve bench-kv`: move the KV of an N-token prefill between two processes over the real gRPC transport on
127.0.0.1, verify that decoding after the import gives the same logits as decoding in place, and report export /
transfer / import times next to a memcpy of the same bytes measured in the same run."""

from __future__ import annotations

import argparse
import json
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
    from llama_relax.compile import default_cache_dir
    from llama_relax.models import default_model_path, open_model
    from llama_relax.runtime import KVCacheConfig

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    cache_dir = args.cache_dir or default_cache_dir()
    model_path = args.model or default_model_path(cache_dir)
    kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=args.tokens + 512, prefill_chunk_size=512)
    model = open_model(model_path, cache_dir=cache_dir, kv=kv, quiet=args.json)
    rt = model.runtime
    if args.tokens >= model.config.context_window_size:
        raise ValueError(f"--tokens must be below the context window ({model.config.context_window_size})")
    seq = 1000
    importer = RuntimeImporter(rt, {"bench": seq}.__getitem__)
    receiver = GrpcKVReceiver(importer, on_orphaned=importer.on_orphaned, **receiver_checks(rt))
    address = receiver.start()
    try:
        prompt = tuple(int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, args.tokens))
        job = SenderJob(model=str(model_path), cache_dir=str(cache_dir), prompt=prompt, seq_id=7, address=address,
                        request_id="bench", decode_tokens=(1,), kv_total_tokens=args.tokens + 512)  # fmt: skip
        log(f"sender process: prefill {args.tokens} tokens, export, push to {address} ...")
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
    wire_s = max(report.transfer_s - report.import_s, 1e-9)
    result = {
        "verified": verified,
        "tokens": args.tokens,
        "bytes": report.bytes,
        "export_ms": 1000 * report.export_s,
        "transfer_ms": 1000 * wire_s,
        "import_ms": 1000 * report.import_s,
        "end_to_end_ms": 1000 * (report.export_s + report.transfer_s),
        "transfer_mib_s": report.bytes / wire_s / MIB,
        "memcpy_mib_s": memcpy_mib_s(report.bytes),
    }
    result["transfer_vs_memcpy"] = result["transfer_mib_s"] / result["memcpy_mib_s"]
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
    p.add_argument("--json", action="store_true")
