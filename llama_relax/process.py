"""Process setup that must happen at a process's entry point, before TVM starts its thread pool."""

from __future__ import annotations

import os


def use_all_cores() -> None:
    """TVM's CPU thread pool defaults to half the logical cores on x86 (1 thread on a 2-core machine); use all
    cores this process may run on unless TVM_NUM_THREADS says otherwise. Call once, first thing in `main`."""
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
