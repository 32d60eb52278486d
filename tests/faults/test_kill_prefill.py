"""`kill -9` of the prefill worker while it holds requests at each of its stages (queued, prefilling, exporting,
transferring) and mid-load: every request completes (the decode worker prefills while the prefill pool is empty,
or the request is recomputed once a token went out), and nothing stays held."""

from __future__ import annotations

import pytest
from faults.drill import (
    SLOW_DECODE,
    assert_completed,
    assert_no_traceback,
    assert_recovered,
    kill,
    prompts,
    start_streams,
    wait_streams,
    wait_until,
)
from serving import wait_for


@pytest.mark.parametrize(
    "fault",
    [
        "prefill_forward:pause:30",  # the first request prefilling, the second queued behind it
        "kv_export:pause:30",  # token 1 sampled and streamed, the KV not exported yet
        "kv_send:pause:30",  # the KV exported, its transfer not started
    ],
    ids=["prefilling+queued", "exporting", "transferring"],
)
def test_prefill_killed_at_a_stage(serve, fault):
    s = serve(faults=[fault])
    streams = start_streams(s, prompts(2, seed=5), max_tokens=8)
    wait_for(s.markers / fault.split(":")[0])
    kill(s.pids("prefill")[0])
    wait_streams(streams)
    assert_completed(streams)
    assert all(len(st.tokens) == 8 for st in streams)
    assert_no_traceback(streams)
    s.wait_alive("prefill", 1, restarts_at_least=1)
    assert_recovered(s)


def test_prefill_killed_mid_load_every_request_completes(serve):
    s = serve("--max-batch-size", "8", faults=[SLOW_DECODE, "prefill_forward:pause:0.2x40"])
    streams = start_streams(s, prompts(10, seed=8), max_tokens=16)
    wait_until(lambda: sum(bool(st.tokens) for st in streams) >= 2, what="some first tokens")
    kill(s.pids("prefill")[0])
    wait_streams(streams)
    assert_completed(streams)
    assert all(len(st.tokens) == 16 for st in streams)
    s.wait_alive("prefill", 1, restarts_at_least=1)
    assert_recovered(s)
