"""`kill -9` of a decode worker mid-stream (and at its other stages): every request completes with the tokens of
an unfailed run, the killed worker comes back (Ray restarts it) and is readmitted, and no page stays held."""

from __future__ import annotations

import time

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
from serving import wait_for


def test_decode_killed_mid_stream_with_two_decode_workers_loses_nothing(serve):
    s = serve("--decode-workers", "2", "--max-batch-size", "8", faults=[SLOW_DECODE])
    ps = prompts(12)
    want = [st.tokens for st in run_all(s, ps, max_tokens=48)]  # the unfailed run, same server
    assert all(len(t) == 48 for t in want)
    streams = start_streams(s, ps, max_tokens=48)
    wait_until(lambda: all(len(st.tokens) >= 4 for st in streams), what="every stream to be decoding")
    victim = wait_until(  # the router's view of a worker's load is refreshed every 0.5 s
        lambda: next((w.pid for w in s.workers() if w.role == "decode" and w.running > 0), None),
        what="a decode worker to report running requests",
    )
    kill(victim)
    wait_streams(streams)
    assert_completed(streams, want)  # 12 of 12, the same tokens as without the kill
    assert_no_traceback(streams)
    assert sum(st.migrations for st in streams) >= 1
    s.wait_alive("decode", 2, restarts_at_least=1)
    assert victim not in s.pids("decode")
    assert_recovered(s)


def test_the_only_decode_worker_killed_three_times_comes_back_each_time(serve):
    s = serve("--max-batch-size", "8", faults=[SLOW_DECODE])
    ps = prompts(4, seed=7)
    want = [st.tokens for st in run_all(s, ps, max_tokens=32)]
    for round_ in range(1, 4):
        streams = start_streams(s, ps, max_tokens=32)
        wait_until(lambda st=streams: all(len(x.tokens) >= 3 for x in st), what="decoding")
        kill(s.pids("decode")[0])
        wait_streams(streams)
        assert_completed(streams, want)  # they waited for the restarted worker, then continued
        s.wait_alive("decode", 1, restarts_at_least=round_)
        time.sleep(1.0)
    assert [w.restarts for w in s.workers() if w.role == "decode"] == [3]
    assert_recovered(s)


def test_decode_killed_while_reserved_or_importing(serve):
    """Reserved: the prefill worker holds the KV back (paused before its send) while the decode worker dies.
    Importing: the decode worker dies inside its import. Either way the request is recomputed and completes."""
    for fault in ("kv_send:pause:4", "decode_import:pause:30"):
        s = serve(faults=[fault])
        stage = fault.split(":")[0]
        streams = start_streams(s, prompts(1, seed=11), max_tokens=8)
        wait_for(s.markers / stage)
        kill(s.pids("decode")[0])
        wait_streams(streams)
        assert_completed(streams)
        assert len(streams[0].tokens) == 8 and streams[0].migrations >= 1
        s.wait_alive("decode", 1, restarts_at_least=1)
        assert_recovered(s)
