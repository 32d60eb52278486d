"""KV transfer with the real compiled tiny model: a sender process prefills and pushes KV over real gRPC on
127.0.0.1; this process imports it into a cache that is already decoding other sequences.

Checks: bit-identical decode after transfer (source sequence id != 0, pages interleaved with another sequence,
length not a multiple of the page size and longer than the prefill chunk, llama3 rope); the destination's running
sequences unaffected; a partial range on top of a prefix; wrong fingerprint / dtype / geometry rejected with the
cache untouched; a cancelled transfer leaves no pages reserved; concurrent transfers into one receiver."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest
from conftest import TINY_GQA
from model_files import write_hf_dir
from reference import random_params

from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.payload import ErrorCode, make_payload
from kvtransfer.peer import SenderJob, spawn_sender
from kvtransfer.runtime_io import RuntimeImporter, export_payload, receiver_checks
from llama_relax.kv_dtype import kv_bytes_per_token
from llama_relax.models import open_model
from llama_relax.runtime import KVCacheConfig

PROMPT = tuple(int(x) for x in np.random.default_rng(9).integers(0, TINY_GQA.vocab_size, 45))  # 45 > chunk 32


class ModelThread:
    """Runs every runtime call on one thread, as a worker's engine loop would."""

    def __init__(self) -> None:
        self.pool = cf.ThreadPoolExecutor(max_workers=1)

    def run(self, fn):
        return self.pool.submit(fn).result()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, compiled_gqa):
    return write_hf_dir(tmp_path_factory.mktemp("kv-model"), TINY_GQA, random_params(TINY_GQA, seed=4))


@pytest.fixture
def dest(model_dir, cache_dir):
    """The decode side: a runtime with two running sequences, a receiver, and a request -> seq id table."""
    kv = KVCacheConfig(max_batch_size=8, max_total_seq_len=1024, prefill_chunk_size=32)
    model = open_model(model_dir, cache_dir=cache_dir, kv=kv, quiet=True)
    rt, mt = model.runtime, ModelThread()
    mt.run(lambda: [rt.add_sequence(s) for s in (1, 2)])
    mt.run(lambda: rt.prefill([1, 2], [[3, 4, 5], list(range(10, 40))]))
    table: dict[str, int] = {}
    importer = RuntimeImporter(rt, table.__getitem__, mt.run)
    receiver = GrpcKVReceiver(importer, max_concurrent=4, on_orphaned=importer.on_orphaned, **receiver_checks(rt))
    address = receiver.start()
    yield model, mt, table, address
    receiver.stop()
    model.close()


def run_sender(model_dir, cache_dir, address, **kw):
    job = SenderJob(
        model=str(model_dir),
        cache_dir=str(cache_dir),
        prompt=PROMPT,
        seq_id=kw.pop("seq_id", 7),
        address=address,
        request_id=kw.pop("request_id", "req-a"),
        **kw,
    )
    proc, conn = spawn_sender(job)
    report = conn.recv() if conn.poll(300) else None
    proc.join(30)
    assert report is not None, "sender process produced no report"
    return report


def test_bit_identical_decode_after_transfer(dest, model_dir, cache_dir):
    model, mt, table, address = dest
    rt = model.runtime
    table["req-a"] = 70
    before_running = {s: rt.sequence_length(s) for s in (1, 2)}
    report = run_sender(model_dir, cache_dir, address)
    assert report.ok, report.error
    assert report.free_pages_after == report.free_pages_before  # sender freed its pages
    assert rt.sequence_length(70) == len(PROMPT) == rt.kv_length_in_cache(70)
    assert {s: rt.sequence_length(s) for s in (1, 2)} == before_running
    # decode the imported sequence inside a batch with the two running ones
    for t, want in zip((1, 2, 3), report.logits, strict=True):
        got = mt.run(lambda t=t: rt.decode([1, 70, 2], [9, t, 9]))  # same batch shape as the sender's
        np.testing.assert_array_equal(got[1], want)


def test_running_sequences_unaffected_by_import(dest, model_dir, cache_dir):
    model, mt, table, address = dest
    rt = model.runtime
    # a twin runtime with the same two sequences and no import: their logits must match exactly
    twin = open_model(
        model_dir,
        cache_dir=cache_dir,
        quiet=True,
        kv=KVCacheConfig(max_batch_size=8, max_total_seq_len=1024, prefill_chunk_size=32),
    )
    twin.runtime.add_sequence(1)
    twin.runtime.add_sequence(2)
    twin.runtime.prefill([1, 2], [[3, 4, 5], list(range(10, 40))])
    table["req-b"] = 71
    assert run_sender(model_dir, cache_dir, address, request_id="req-b").ok
    got = mt.run(lambda: rt.decode([1, 2], [6, 7]))
    np.testing.assert_array_equal(got, twin.runtime.decode([1, 2], [6, 7]))
    twin.close()


def test_partial_range_on_top_of_a_prefix(dest, model_dir, cache_dir):
    model, mt, table, address = dest
    rt = model.runtime
    table["req-p"] = 72
    mt.run(lambda: rt.add_sequence(72))
    mt.run(lambda: rt.prefill([72], [list(PROMPT[:20])]))  # the decode side computed the first 20 itself
    report = run_sender(model_dir, cache_dir, address, request_id="req-p", begin=20)
    assert report.ok, report.error
    assert rt.sequence_length(72) == len(PROMPT)
    got = mt.run(lambda: rt.decode([72], [1]))[0]
    # the first 20 tokens' K/V came from a forward of another length here: float32 sums in another order, which
    # float16 KV can round one ulp apart (2^-11): close, not bit-equal (whole transfers are, above)
    np.testing.assert_allclose(got, report.logits[0], rtol=0, atol=2e-3)


def test_bad_payloads_rejected_cache_untouched(dest):
    model, _, table, address = dest
    rt = model.runtime
    c = rt.config
    table.update({"fp": 80, "dt": 81, "geo": 82, "nosuchreq": 0})
    del table["nosuchreq"]
    free, seqs = rt.free_pages(), sorted(rt.sequence_ids())
    shape = rt.kv_shape(20)
    kv_dtype = rt.compiled.kv_dtype  # the serve default, float16
    other = "float32" if kv_dtype == "float16" else "float16"
    k = np.ones(shape, kv_dtype)
    sender = GrpcKVSender()
    try:
        cases = {
            "fp": (make_payload(k, k, "not-this-model", 0, "fp"), ErrorCode.FINGERPRINT_MISMATCH),
            "dt": (
                make_payload(k.astype(other), k.astype(other), rt.kv_fingerprint(), 0, "dt"),
                ErrorCode.DTYPE_MISMATCH,
            ),
            "geo": (
                make_payload(
                    np.ones((c.num_hidden_layers + 1, *shape[1:]), kv_dtype),
                    np.ones((c.num_hidden_layers + 1, *shape[1:]), kv_dtype),
                    rt.kv_fingerprint(),
                    0,
                    "geo",
                ),
                ErrorCode.SHAPE_MISMATCH,
            ),
            "unknown-request": (make_payload(k, k, rt.kv_fingerprint(), 0, "unknown-request"), ErrorCode.IMPORT_FAILED),
            "gap": (make_payload(k, k, rt.kv_fingerprint(), 5, "fp"), None),  # starts at 5, sequence absent
        }
        for name, (payload, code) in cases.items():
            result = sender.send(payload, address, 30)
            assert not result.ok, name
            if code is not None:
                assert result.error == code, (name, result)
    finally:
        sender.close()
    assert rt.free_pages() == free and sorted(rt.sequence_ids()) == seqs


def test_cancelled_transfer_reserves_nothing(dest, model_dir, cache_dir):
    model, mt, table, address = dest
    rt = model.runtime
    free, seqs = rt.free_pages(), sorted(rt.sequence_ids())
    table["slow"] = 90
    gate = threading.Event()
    importer_calls = []

    # block the model thread so the transfer is in flight when we cancel it
    mt.pool.submit(gate.wait)
    k, v = np.ones(rt.kv_shape(64), rt.compiled.kv_dtype), np.ones(rt.kv_shape(64), rt.compiled.kv_dtype)
    payload = make_payload(k, v, rt.kv_fingerprint(), 0, "slow", chunk_bytes=4096)
    sender = GrpcKVSender()
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(sender.send, payload, address, 30)
        threading.Timer(0.05, lambda: importer_calls.append(sender.cancel("slow"))).start()
        result = fut.result(60)
    # the sender sees CANCELLED at once; the receiver learns of it when gRPC delivers the stream reset. Opening the
    # model thread before that lets the import finish "before" the cancel, which only a decode engine's lease
    # covers (kvtransfer.transport). Give the reset time to arrive: this test is about the receiver's orphan path.
    time.sleep(0.5)
    gate.set()
    sender.close()
    if not result.ok:
        assert result.error in (ErrorCode.CANCELLED, ErrorCode.TIMEOUT)
        # the receiver finishes (or undoes, via on_orphaned) the import on the model thread shortly after
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and mt.run(rt.free_pages) != free:
            time.sleep(0.05)
        assert rt.free_pages() == free and sorted(rt.sequence_ids()) == seqs
    else:  # the cancel lost the race: the import completed; removing the sequence frees everything
        mt.run(lambda: rt.remove_sequence(90))
        assert rt.free_pages() == free


def test_concurrent_transfers_into_one_receiver(dest):
    model, mt, table, address = dest
    rt = model.runtime
    src = open_model(
        model.source.path,
        cache_dir=model.compiled.lib_path.parent,
        quiet=True,
        kv=KVCacheConfig(max_batch_size=8, max_total_seq_len=2048, prefill_chunk_size=32),
    )
    payloads = []
    for i in range(4):
        sid = 200 + i
        src.runtime.add_sequence(sid)
        src.runtime.prefill([sid], [[i + 1] * (17 + 9 * i)])
        payloads.append(export_payload(src.runtime, sid, f"c{i}"))
        table[f"c{i}"] = 300 + i
    senders = [GrpcKVSender() for _ in payloads]
    with cf.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda a: a[0].send(a[1], address, 60), zip(senders, payloads, strict=True)))
    assert all(r.ok for r in results), results
    for i in range(4):
        assert rt.sequence_length(300 + i) == 17 + 9 * i
        got = mt.run(lambda i=i: rt.decode([300 + i], [1]))[0]
        np.testing.assert_array_equal(got, src.runtime.decode([200 + i], [1])[0])
    for s in senders:
        s.close()
    src.close()


def test_bench_kv_cli_reports_warm_repeats(model_dir, cache_dir):
    """`pdserve bench-kv --json` end to end: verified, warm and cold transfers, every documented field."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PDSERVE_CACHE_DIR": str(cache_dir)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve",
            "bench-kv",
            "--model",
            str(model_dir),
            "--cache-dir",
            str(cache_dir),
            "--tokens",
            "45",
            "--repeats",
            "3",
            "--no-bare",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verified"] is True and out["repeats"] == 3 and out["tokens"] == 45
    c = TINY_GQA
    assert out["bytes"] == 45 * kv_bytes_per_token(c, "float16")  # the default KV cache dtype
    for key in ("export_ms", "transfer_ms", "cold_transfer_ms", "import_ms", "transfer_mib_s", "memcpy_mib_s"):
        assert out[key] > 0, key
    assert out["transfer_vs_memcpy"] == pytest.approx(out["transfer_mib_s"] / out["memcpy_mib_s"])
    assert "bare_grpc_mib_s" not in out
