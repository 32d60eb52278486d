"""Backpressure, bad input, a broken engine and drain, through a real server: requests queue instead of being
refused, past the bound they are refused at once, bad input never breaks a worker, a broken engine's process is
restarted, no response carries a traceback, and SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import signal

import grpc
import pytest
from faults.drill import (
    SLOW_DECODE,
    assert_completed,
    assert_no_traceback,
    assert_recovered,
    prompts,
    run_all,
    start_streams,
    wait_streams,
    wait_until,
)
from serving import assert_clean_exit, collect, request, scrape_metric

from kvtransfer.net import free_port


def test_48_concurrent_requests_against_a_batch_of_16_queue_and_all_complete_and_past_the_bound_are_refused(serve):
    metrics_port = free_port()
    s = serve(
        *("--max-batch-size", "16", "--max-total-seq-len", "4096", "--max-queued-requests", "40"),
        *("--metrics-port", str(metrics_port)),
        faults=[SLOW_DECODE],
    )
    streams = run_all(s, prompts(48, seed=1), max_tokens=16)
    assert_completed(streams)
    assert all(len(st.tokens) == 16 for st in streams)
    assert_no_traceback(streams)
    # 16 running + 40 waiting: the bound. Each running request has >= 127 steps of >= 20 ms left once the queue
    # is seen full, so nothing frees a place in the queue before the late requests are answered.
    filling = start_streams(s, prompts(56, seed=2), max_tokens=128)
    wait_until(lambda: sum(bool(st.tokens) for st in filling) >= 16, what="a full batch")
    wait_until(lambda: scrape_metric(metrics_port, "pdserve_admission_queue_requests") == 40, what="a full queue")
    late = run_all(s, prompts(4, seed=3), max_tokens=4)
    assert [st.code for st in late] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4, [st.details for st in late]
    assert all("queue full" in st.details for st in late)  # refused at admission, not served late
    wait_streams(filling)
    assert_completed(filling)  # the ones that were waiting were served, none refused
    assert_recovered(s)


def test_bad_input_never_breaks_a_worker_and_a_broken_engine_is_restarted(serve):
    s = serve(faults=["prefill_forward:fail"])
    for rid, why in [("r" * (1 << 20), "at most 128"), ("bad id!", "only letters")]:
        with pytest.raises(grpc.RpcError) as e:
            collect(s.stub, request([1, 2, 3], request_id=rid))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in e.value.details() and why in e.value.details()
    # the first forward hits the injected bug: that request gets INTERNAL with an error id, never a traceback
    broken = run_all(s, prompts(1, seed=30), max_tokens=4)
    assert broken[0].code is grpc.StatusCode.INTERNAL, (broken[0].code, broken[0].details)
    assert "error id" in broken[0].details
    assert_no_traceback(broken)
    s.wait_alive("prefill", 1, restarts_at_least=1)  # the broken engine's process exited and Ray restarted it
    error_id = broken[0].details.rsplit("error id ", 1)[1].rstrip(")")
    assert f"error id {error_id}" in s.output()  # the details are in the server's log, under the same id
    assert_recovered(s)


def test_sigterm_drains_in_flight_requests_then_everything_stops(serve):
    s = serve("--drain-timeout", "60", faults=[SLOW_DECODE])
    streams = start_streams(s, prompts(4, seed=40), max_tokens=40)
    wait_until(lambda: all(len(st.tokens) >= 2 for st in streams), what="decoding")
    pids = s.tree_pids()
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in s.output(), what="the drain to start")
    with pytest.raises(grpc.RpcError) as e:
        collect(s.stub, request([1, 2], max_tokens=2), timeout=10)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,)
    wait_streams(streams)
    assert_completed(streams)
    assert all(len(st.tokens) == 40 for st in streams)
    assert_clean_exit(s, pids=pids)
