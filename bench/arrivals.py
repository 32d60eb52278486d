"""Request arrival times: gamma-distributed gaps (shape = burstiness, scale = 1 / (rate * burstiness)), so the
mean gap is 1/rate and the coefficient of variation is 1/sqrt(burstiness); burstiness 1 is a Poisson process.

The gaps are drawn as standard gamma(b, 1/b) variates from the seed and divided by the rate, so a sweep over
rates replays the same arrival pattern, only stretched; rate inf sends everything at t = 0."""

from __future__ import annotations

import math

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
