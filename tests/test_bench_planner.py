"""The bench's pieces for the planner (#29): `--rate-schedule` (one arrival pattern stretched segment by segment),
the pool-size sampler and worker-seconds, and a planned run's report (table line, JSON, pools plot)."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
from test_bench_units import outcomes, timeline

from bench.report import format_table, write_plots, write_results
from bench.stats import latency_samples_ms


def test_rate_schedule_parses_and_stretches_one_arrival_pattern():
    from bench.arrivals import RateSchedule, arrival_offsets, schedule_offsets

    s = RateSchedule.parse("0:0.2, 60:2, 120:0.2")
    assert (s.starts, s.rates) == ((0.0, 60.0, 120.0), (0.2, 2.0, 0.2)) and s.rate_at(90) == 2.0
    flat = schedule_offsets(50, RateSchedule.parse("0:4"), 1.0, seed=3)
    np.testing.assert_allclose(flat, arrival_offsets(50, 4.0, 1.0, seed=3))  # one rate: the plain arrivals
    o = schedule_offsets(400, s, 1.0, seed=0)
    assert np.all(np.diff(o) >= 0) and o[0] == 0
    unit = arrival_offsets(400, 1.0, 1.0, seed=0)  # the same pattern: 12 expected arrivals, then 120, then 0.2/s
    assert ((o < 60) == (unit < 12)).all() and ((o < 120) == (unit < 132)).all()
    np.testing.assert_allclose(o[unit >= 132], 120 + (unit[unit >= 132] - 132) / 0.2)
    for bad, why in (
        ("5:1", "must start at 0"),
        ("0:1,0:2", "times must increase"),
        ("0:0", "RATE > 0"),
        ("0:1,x", "expected SECONDS:RATE"),
    ):
        with pytest.raises(ValueError, match=why):
            RateSchedule.parse(bad)


def test_pool_sampler_timeline_and_worker_seconds():
    from bench.pools import PoolSampler, worker_seconds

    sizes = iter([{"decode": 1, "prefill": 1}, {"decode": 2, "prefill": 1}] + [{"decode": 1, "prefill": 1}] * 10**6)
    seen = threading.Event()

    def status():
        seen.set()
        return next(sizes)

    sampler = PoolSampler(status, interval_s=0.001).start(0.0)
    seen.wait(10)
    timeline = sampler.stop()
    assert timeline and timeline[0][1] == {"decode": 1, "prefill": 1}
    fixed = ((0.0, {"decode": 1, "prefill": 1}), (10.0, {"decode": 2, "prefill": 1}), (30.0, {"decode": 1}))
    assert worker_seconds(fixed, 40.0) == {"decode": 10 + 40 + 10, "prefill": 30}

    def broken():
        raise RuntimeError("busy")

    assert PoolSampler(broken, interval_s=0.001).start(0.0).stop() == ()  # failed samples are skipped


def test_a_planned_run_reports_worker_seconds_and_plots_its_pools(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.pools import run_points

    recs = timeline()
    sent, gaps = run_points(recs, start=min(r.sent for r in recs))
    assert len(sent) == len(latency_samples_ms(recs)["ttft_ms"]) and gaps
    pools = ((0.0, {"prefill": 1, "decode": 1}), (1.0, {"prefill": 1, "decode": 2}), (1.5, {"prefill": 1, "decode": 1}))
    run = dataclasses.replace(outcomes()[0], pools=pools, duration_s=2.0, itl_points=gaps, sent_s=sent)
    assert run.worker_seconds == {"prefill": 2.0, "decode": 2.5}
    assert "Worker-seconds (A @ 1 req/s): decode 2, prefill 2 (pool sizes seen: [1, 2])" in format_table([run], "t")
    doc = json.loads(write_results(tmp_path, {}, [run]).read_text())["runs"][0]
    assert doc["worker_seconds"] == {"prefill": 2.0, "decode": 2.5} and doc["pool_timeline"][1]["decode"] == 2
    assert "pools_A.png" in [p.name for p in write_plots(tmp_path, [run])]
