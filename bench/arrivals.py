"""Request arrival times: gamma-distributed gaps (shape = burstiness, scale = 1 / (rate * burstiness)), so the
mean gap is 1/rate and the coefficient of variation is 1/sqrt(burstiness); burstiness 1 is a Poisson process.

The gaps are drawn as standard gamma(b, 1/b) variates from the seed and divided by the rate, so a sweep over
rates replays the same arrival pattern, only stretched; rate inf sends everything at t = 0."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARRIVALS_STREAM = 1  # seed stream id, distinct from the workload's


def check_rate(rate: float) -> float:
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"request rate must be > 0 req/s (or inf), got {rate}")
    return rate


def check_burstiness(burstiness: float) -> float:
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness}")
    return burstiness


def gaps(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """`n` inter-arrival gaps in seconds (all zero at rate inf)."""
    check_rate(rate)
    check_burstiness(burstiness)
    if n < 0:
        raise ValueError(f"number of gaps must be >= 0, got {n}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng([seed, ARRIVALS_STREAM])
    return rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=n) / rate


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send time of each of `n` requests relative to the start, seconds; the first is sent at 0."""
    g = gaps(max(n - 1, 0), rate, burstiness, seed)
    return np.concatenate([np.zeros(min(n, 1)), np.cumsum(g)])


@dataclass(frozen=True)
class RateSchedule:
    """`--rate-schedule "0:0.2,60:2,120:0.2"`: from second `starts[i]` on, requests arrive at `rates[i]` req/s
    (the last rate holds until every request is sent)."""

    starts: tuple[float, ...]
    rates: tuple[float, ...]

    @classmethod
    def parse(cls, text: str, flag: str = "--rate-schedule") -> RateSchedule:
        starts, rates = [], []
        for part in text.split(","):
            at, sep, rate = part.strip().partition(":")
            try:
                t, r = float(at), float(rate)
            except ValueError:
                raise ValueError(f"{flag}: expected SECONDS:RATE,..., got {part.strip()!r}") from None
            if not sep or not (math.isfinite(t) and t >= 0) or not (math.isfinite(r) and r > 0):
                raise ValueError(f"{flag}: expected SECONDS:RATE with SECONDS >= 0 and RATE > 0, got {part.strip()!r}")
            if starts and t <= starts[-1]:
                raise ValueError(f"{flag}: times must increase, got {t:g} after {starts[-1]:g}")
            starts.append(t)
            rates.append(r)
        if not starts or starts[0] != 0:
            raise ValueError(f"{flag}: the first segment must start at 0, got {text!r}")
        return cls(tuple(starts), tuple(rates))

    def rate_at(self, t: float) -> float:
        i = max(i for i, s in enumerate(self.starts) if s <= t)
        return self.rates[i]

    def time_of(self, work: np.ndarray) -> np.ndarray:
        """The times at which the expected arrivals since 0 (the integrated rate) reach each of `work` (sorted)."""
        spans = zip(self.starts[:-1], self.starts[1:], self.rates[:-1], strict=True)
        done = np.concatenate([[0.0], np.cumsum([r * (e - s) for s, e, r in spans])])  # at each segment's start
        seg = np.searchsorted(done, work, side="right") - 1  # the segment each lands in
        seg = np.minimum(seg, len(self.rates) - 1)
        starts, rates = np.asarray(self.starts), np.asarray(self.rates)
        return starts[seg] + (work - done[seg]) / rates[seg]


def schedule_offsets(n: int, schedule: RateSchedule, burstiness: float, seed: int) -> np.ndarray:
    """Send times of `n` requests under a piecewise rate: the same unit-rate arrival pattern as
    `arrival_offsets(n, 1, ...)` (so runs under one seed replay one pattern), stretched segment by segment."""
    unit = arrival_offsets(n, 1.0, burstiness, seed)  # arrivals of a rate-1 process: expected-arrival "work"
    return schedule.time_of(unit)
