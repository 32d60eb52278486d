"""Pool sizes over a run (#29): a sampler asks the server for its live workers per role every second while the
requests run (gRPC `GetClusterStatus`), so a report can show the planner's pool sizes beside TTFT and ITL, and
count the worker-seconds each configuration used.

Call order: `PoolSampler(status).start(t0)` when the run starts -> `stop()` -> `timeline` (seconds since t0, live
workers per role), `worker_seconds(timeline, end_s)`, `plot_timeline(...)`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

Timeline = tuple[tuple[float, Mapping[str, int]], ...]  # (seconds since the run's start, live workers per role)


class PoolSampler:
    """Samples `status()` (live workers per role) every `interval_s` on a thread of its own; a failed sample is
    skipped (the server may be busy), never fatal to the run."""

    def __init__(self, status: Callable[[], Mapping[str, int]], interval_s: float = 1.0) -> None:
        self.status, self.interval_s = status, interval_s
        self._samples: list[tuple[float, Mapping[str, int]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self, t0: float) -> PoolSampler:
        """`t0`: the run's start on `time.perf_counter()`'s clock."""
        self._t0 = t0
        self._thread = threading.Thread(target=self._run, name="pool-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                counts = dict(self.status())
                self._samples.append((time.perf_counter() - self._t0, counts))
            except Exception:
                pass
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> Timeline:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return tuple(self._samples)


def worker_seconds(timeline: Timeline, end_s: float) -> dict[str, float]:
    """Seconds x live workers per role over [first sample, end_s], each sample holding until the next."""
    out: dict[str, float] = {}
    for (t, counts), nxt in zip(timeline, [*(t for t, _ in timeline[1:]), end_s], strict=True):
        for role, n in counts.items():
            out[role] = out.get(role, 0.0) + n * max(0.0, min(nxt, end_s) - t)
    return out


def plot_timeline(
    plt, path: Path, timeline: Timeline, sent_s: Sequence[float], ttft_ms: Sequence[float], itl: Sequence[tuple]
) -> Path:
    """Pool sizes (steps) over the run, with each request's TTFT at its send time and each gap's ITL at its time
    (`itl`: (seconds, ms) pairs)."""
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    roles = sorted({r for _, counts in timeline for r in counts})
    for role in roles:
        axes[0].step([t for t, _ in timeline], [c.get(role, 0) for _, c in timeline], where="post", label=role)
    axes[0].set_ylabel("live workers")
    axes[0].legend()
    axes[1].plot(sent_s, ttft_ms, ".", markersize=3)
    axes[1].set_ylabel("TTFT (ms)")
    axes[2].plot([t for t, _ in itl], [ms for _, ms in itl], ".", markersize=2)
    axes[2].set_ylabel("ITL (ms)")
    axes[2].set_xlabel("seconds since the run started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_points(records: Sequence, start: float) -> tuple[tuple[float, ...], tuple[tuple[float, float], ...]]:
    """For the timeline plot: the send time of each completed request with a TTFT (the order of
    `latency_samples_ms`'s TTFTs), and (time, gap ms) of every streamed gap; seconds since `start`."""
    ok = [r for r in records if r.ok and r.ttft is not None]
    sent = tuple(r.sent - start for r in ok)
    gaps = tuple(
        (b - start, (b - a) * 1e3)
        for r in records
        if r.ok
        for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)
    )
    return sent, gaps
