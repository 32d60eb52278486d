"""Workers that stop answering (SIGSTOP) and KV streams that are corrupted, truncated or stalled: requests move on
(another decode worker, the decode-only fallback, a retried or recomputed transfer) and nothing leaks."""

from __future__ import annotations

import signal
import time
import urllib.request

from faults.drill import (
    SLOW_DECODE,
    assert_completed,
    assert_no_traceback,
    assert_recovered,
    kill,
    prompts,
    run_all,
    start_streams,
    wait_streams,
    wait_until,
)
from serving import Server

from kvtransfer.net import free_port


def metric(s: Server, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


def serve_with_metrics(serve, *flags, faults=()):
    port = free_port()
    s = serve("--metrics-port", str(port), *flags, faults=faults)
    s.metrics_port = port
    return s


def test_a_stopped_decode_worker_is_treated_as_failed_and_its_requests_migrate(serve):
    s = serve("--decode-workers", "2", "--max-batch-size", "8", "--stall-timeout", "2", faults=[SLOW_DECODE])
    ps = prompts(6, seed=4)
    want = [st.tokens for st in run_all(s, ps, max_tokens=40)]
    streams = start_streams(s, ps, max_tokens=40)
    wait_until(lambda: all(len(st.tokens) >= 3 for st in streams), what="decoding")
    # the status is the pool monitor's last poll, which can lag the streams by a poll interval
    busy = wait_until(lambda: [w.pid for w in s.workers() if w.role == "decode" and w.running > 0], what="status")
    stopped = busy[0]
    kill(stopped, signal.SIGSTOP)
    try:
        wait_streams(streams)
        assert_completed(streams, want)
        assert sum(st.migrations for st in streams) >= 1
    finally:
        kill(stopped, signal.SIGCONT)
    assert_recovered(s)  # the stopped worker answers again, frees what it held, and is readmitted


def test_empty_prefill_pool_falls_back_and_empty_decode_pool_waits_until_it_is_back(serve):
    s = serve_with_metrics(serve, "--stall-timeout", "2")
    p = s.pids("prefill")[0]
    kill(p, signal.SIGSTOP)
    try:
        wait_until(lambda: not any(w.alive for w in s.workers() if w.role == "prefill"), what="prefill marked dead")
        streams = run_all(s, prompts(3, seed=6), max_tokens=6)  # no prefill worker: the decode worker prefills
        assert_completed(streams)
        assert metric(s, "pdserve_prefill_fallbacks_total") >= 3
    finally:
        kill(p, signal.SIGCONT)
    s.wait_alive("prefill", 1)
    d = s.pids("decode")[0]
    kill(d, signal.SIGSTOP)
    try:
        wait_until(lambda: not any(w.alive for w in s.workers() if w.role == "decode"), what="decode marked dead")
        streams = start_streams(s, prompts(3, seed=12), max_tokens=6)
        time.sleep(3.0)
        assert not any(st.done.is_set() for st in streams)  # waiting for a decode worker, not refused
    finally:
        kill(d, signal.SIGCONT)
    wait_streams(streams)
    assert_completed(streams)
    assert_recovered(s)


def test_corrupted_truncated_and_stalled_kv_streams(serve):
    """Corrupt and truncate: the prefill worker's one retry delivers. Stall past the KV lease: the send gives up
    (counted as an expired lease) and the router recomputes the request."""
    s = serve_with_metrics(
        serve, "--kv-lease-s", "2", faults=["kv_send:corrupt", "kv_send:truncate", "kv_send:stall:4"]
    )
    for p in prompts(3, seed=21):  # one request per fault, in the order they fire
        streams = run_all(s, [p], max_tokens=6)
        assert_completed(streams)
        assert len(streams[0].tokens) == 6
        assert_no_traceback(streams)
    assert metric(s, "pdserve_kv_transfer_retries_total") >= 2
    assert metric(s, "pdserve_request_migrations_total") >= 1
    wait_until(lambda: metric(s, "pdserve_kv_lease_expired_total") >= 1, what="the expired lease counted")
    assert_recovered(s)
