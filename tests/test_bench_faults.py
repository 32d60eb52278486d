"""`pdserve bench --fault`: spec parsing, the schedule that injects faults into real processes at set times, and
the impact computed from client records (no server)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
from serving import wait_until

from bench.faults import FaultAction, FaultEvent, FaultSchedule, FaultSpec, fault_impact, is_local
from bench.stats import RequestRecord, compute_metrics


def test_fault_specs_parse_and_bad_ones_name_the_flag():
    assert FaultSpec.parse("kill:decode@10s") == FaultSpec(FaultAction.KILL, "decode", 10.0)
    assert FaultSpec.parse("stop:prefill@5+3") == FaultSpec(FaultAction.STOP, "prefill", 5.0, 3.0)
    assert str(FaultSpec.parse("stop:prefill@5s+3s")) == "stop:prefill@5s+3s"
    for bad in ("kill:router@1", "kill:decode", "stop:decode@1", "explode:decode@1"):
        with pytest.raises(ValueError, match="--fault"):
            FaultSpec.parse(bad)
    assert is_local("127.0.0.1:50051") and is_local("[::1]:1") and not is_local("10.0.0.2:50051")


def test_the_schedule_kills_and_stops_real_processes_on_time():
    """Order and signals, not timing: every check waits for the state it expects (the hold is long enough that a
    descheduled test thread still sees the stopped process)."""
    victims = {role: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for role in ("a", "b")}
    status = lambda role: psutil.Process(victims[role].pid).status()  # noqa: E731
    try:
        sched = FaultSchedule(
            [
                FaultSpec(FaultAction.STOP, "b", 0.1, 3.0),
                FaultSpec(FaultAction.KILL, "a", 0.2),
                FaultSpec(FaultAction.KILL, "none", 0.0),
            ],
            lambda role: victims[role].pid if role in victims else None,
        )
        t0 = time.perf_counter()
        sched.start(t0)
        wait_until(lambda: len(sched.events) == 3)  # join() would skip the faults not yet due
        assert status("b") == psutil.STATUS_STOPPED
        events = sched.join()
        assert victims["a"].wait(30) == -signal.SIGKILL
        wait_until(lambda: status("b") != psutil.STATUS_STOPPED)  # SIGCONT after the hold
        assert [e.spec.role for e in events] == ["none", "b", "a"]
        assert "no live none worker" in events[0].error and events[2].at - t0 >= 0.199  # never early
    finally:
        for p in victims.values():
            p.kill()


def test_impact_counts_in_flight_and_migrated_and_finds_the_spike():
    # two streams at 10 ms per token; the fault at t=1.0 s opens a 500 ms gap in the first one
    steady = tuple(0.5 + 0.01 * i for i in range(100))
    spiked = tuple([0.5 + 0.01 * i for i in range(50)] + [1.5 + 0.01 * i for i in range(50)])
    records = [
        RequestRecord(0.4, 1.6, steady, 100, 5, 100),
        RequestRecord(0.4, 2.0, spiked, 100, 5, 100, migrations=1),
        RequestRecord(2.5, 2.6, (2.55,), 1, 5, 1),  # not in flight at the fault
    ]
    impact = fault_impact(FaultEvent(FaultSpec(FaultAction.KILL, "decode", 1.0), 1.0, 42), records, 0.0)
    assert (impact.in_flight, impact.migrated_requests, impact.pid) == (2, 1, 42)
    assert impact.itl_p50_before_ms == pytest.approx(10.0)
    assert impact.worst_gap_after_ms == pytest.approx(510.0)
    assert compute_metrics(records, 2.2).migrated == 1
