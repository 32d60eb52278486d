"""A prefill-side peer process for KV-transfer checks (tests and `pdserve bench-kv`).

`spawn_sender(...)` starts a separate Python process that opens the model, prefills a prompt into a sequence whose
pages are interleaved with another sequence's (so they are not contiguous), exports the KV, sends it to a
receiver address over gRPC (`repeats` > 1: first under derived request ids, to measure warm transfers; the last
send always uses `request_id`), then decodes a few fixed tokens *in place* and reports the logits, so the parent can
check that decoding after the transfer is bit-identical. Results come back over a multiprocessing pipe as a
frozen `SenderReport` (plain data; KV bytes never travel this way).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SenderJob:
    model: str
    cache_dir: str
    prompt: tuple[int, ...]
    seq_id: int
    address: str
    request_id: str
    begin: int = 0  # send tokens [begin, len(prompt)) (the receiver holds the prefix)
    decode_tokens: tuple[int, ...] = (1, 2, 3)
    timeout_s: float = 60.0
    kv_total_tokens: int = 4096
    repeats: int = 1  # send the same KV this many times, as request ids f"{request_id}#{i}" for i < repeats - 1


@dataclass(frozen=True)
class SenderReport:
    ok: bool
    error: str = ""
    bytes: int = 0
    export_s: float = 0.0
    transfer_s: float = 0.0
    import_s: float = 0.0
    repeat_transfer_s: tuple[float, ...] = ()  # every send's wall time (the last one is `transfer_s`)
    repeat_import_s: tuple[float, ...] = ()
    logits: list[np.ndarray] = field(default_factory=list)  # in-place decode logits, one [V] per decode token
    free_pages_before: int = 0
    free_pages_after: int = 0


def _sender_main(job: SenderJob, conn) -> None:
    from llama_relax.process import use_all_cores

    use_all_cores()  # this process's entry point
    from kvtransfer.grpc_transport import GrpcKVSender
    from kvtransfer.payload import KVPayload
    from kvtransfer.runtime_io import export_payload
    from llama_relax.models import open_model
    from llama_relax.runtime import KVCacheConfig

    try:
        kv = KVCacheConfig(max_batch_size=4, max_total_seq_len=job.kv_total_tokens, prefill_chunk_size=512)
        model = open_model(Path(job.model), cache_dir=Path(job.cache_dir), kv=kv, quiet=True)
        rt = model.runtime
        free_before = rt.free_pages()
        other = job.seq_id + 1
        rt.add_sequence(job.seq_id)
        rt.add_sequence(other)
        half = max(1, len(job.prompt) // 3)
        rt.prefill([job.seq_id], [list(job.prompt[:half])])  # interleave pages with `other`
        rt.prefill([other], [[5] * 23])
        rt.prefill([job.seq_id], [list(job.prompt[half:])])
        t0 = time.perf_counter()
        payload = export_payload(rt, job.seq_id, job.request_id, begin=job.begin)
        export_s = time.perf_counter() - t0
        sender = GrpcKVSender()
        results = []
        for i in range(job.repeats):
            rid = job.request_id if i == job.repeats - 1 else f"{job.request_id}#{i}"
            results.append(
                sender.send(
                    KVPayload(replace(payload.header, request_id=rid), payload.k, payload.v), job.address, job.timeout_s
                )
            )
            if not results[-1].ok:
                break
        result = results[-1]
        sender.close()
        # decode in place in a batch of three (the imported row sits in the middle on the receiving side too), so
        # both sides run kernels of the same batch shape: bit-identity is then expected, not just closeness
        filler = job.seq_id + 2
        rt.add_sequence(filler)
        rt.prefill([filler], [[7] * 11])
        logits = [rt.decode([other, job.seq_id, filler], [9, t, 9])[1] for t in job.decode_tokens]
        for s in (job.seq_id, other, filler):
            rt.remove_sequence(s)
        report = SenderReport(
            ok=result.ok,
            error=f"{result.error}: {result.message}" if not result.ok else "",
            bytes=result.nbytes,
            export_s=export_s,
            transfer_s=result.transfer_s,
            import_s=result.import_s,
            logits=logits,
            repeat_transfer_s=tuple(r.transfer_s for r in results),
            repeat_import_s=tuple(r.import_s for r in results),
            free_pages_before=free_before,
            free_pages_after=rt.free_pages(),
        )
        model.close()
    except Exception as e:
        report = SenderReport(ok=False, error=f"{type(e).__name__}: {e}")
    conn.send(report)
    conn.close()


def spawn_sender(job: SenderJob) -> tuple[mp.Process, object]:
    """Start the sender process; returns it and the pipe end to `recv()` its `SenderReport` from."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_sender_main, args=(job, child), daemon=True)
    proc.start()
    child.close()
    return proc, parent
