"""Sampling parameters (validated once, at the edge) and a seed-reproducible per-request sampler."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` is greedy; `top_k == 0` disables top-k."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [V] -> [V], float64
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def top_logprobs(logits: np.ndarray, k: int) -> list[TokenLogprob]:
    """The k most likely tokens under the model's (untempered) distribution, best first."""
    if k <= 0:
        return []
    lp = log_softmax(logits)
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.lexsort((idx, -lp[idx]))]  # by logprob desc, ties by id
    return [TokenLogprob(int(i), float(lp[i])) for i in idx]


class Sampler:
    """Draws tokens for one request. The draw for output token `step` uses an RNG keyed by (seed, step), so a
    request's tokens do not depend on which process samples them (prefill worker: step 0, decode worker: the
    rest) nor on how many draws came before. `seed=None` picks a random seed once per sampler."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % 2**63)

    def sample(self, logits: np.ndarray, step: int = 0) -> int:
        """logits: float32 [V] -> the chosen token id for output position `step`."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x >= kth, x, -np.inf)
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]  # smallest prefix with mass >= top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        u = np.random.default_rng((self.seed, step)).random()
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), probs.size - 1))


def resolve_seed(params: SamplingParams) -> SamplingParams:
    """Give a seedless request a concrete random seed (at the edge), so every worker samples it alike."""
    if params.seed is not None or params.greedy:
        return params
    return dataclasses.replace(params, seed=int(np.random.SeedSequence().entropy % 2**63))
