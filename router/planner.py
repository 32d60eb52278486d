"""The planner (#29): sizes the prefill and decode pools to an SLO. Pure: it reads the signals the router already
has, once per tick, and returns at most one step per pool; `router.scaling` carries the steps out.

Policy, per tick (`--planner-interval-s`):
  - prefill: the predicted TTFT of the queue, `queued prompt tokens / (workers x measured prefill tokens/s per
    worker)`. Above the TTFT target: one worker more. Below `low_water` x the target even with one worker fewer,
    for `down_ticks` ticks in a row: one worker fewer.
  - decode: the p90 inter-token latency over the last interval, and how full the pool is (running sequences
    against the batch slots, KV pages in use). ITL above the target, or slots or pages above `high_use`: one more.
    ITL below `low_water` x the target and what runs fitting in one worker fewer at `low_use`, for `down_ticks`
    ticks: one fewer.
  - the MIN:MAX bounds win over both (a pool below MIN grows, above MAX shrinks), and nothing moves while a step
    of that pool is still under way (`busy`).
  - role switch: when one pool must grow but cannot (at MAX, or its new worker found no node: `stuck`) and the
    other may give a worker (above its MIN, not growing, not needing one), a worker of the other pool changes
    role instead. While a pool waits for a new worker, the other pool's shrink is held: that worker may be the
    one to switch.

Call order: `Planner(ranges, slo)` once; `tick(signals)` every interval -> `Decision`s (each with its reason, for
the log and `pdserve_planner_decisions_total`)."""

from __future__ import annotations

import collections
import enum
import re
import threading
from dataclasses import dataclass, field

from engine.messages import Role


class Direction(enum.Enum):
    UP = "up"
    DOWN = "down"
    SWITCH = "switch"  # a worker of `source` becomes one of `role`


class Reason(enum.Enum):
    BELOW_MIN = "below_min"
    ABOVE_MAX = "above_max"
    TTFT = "ttft"  # predicted TTFT over the target
    ITL = "itl"  # p90 ITL over the target
    SLOTS = "slots"  # batch slots nearly all taken
    KV = "kv"  # KV pages nearly all in use
    IDLE = "idle"  # the SLO holds with one worker fewer
    NO_NODE = "no_node"  # the pool must grow and cannot: a worker switches role instead


@dataclass(frozen=True)
class PoolRange:
    """`--prefill-workers MIN:MAX` (a plain N is N:N: a fixed size)."""

    min: int
    max: int

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    @classmethod
    def parse(cls, text: str, flag: str, least: int) -> PoolRange:
        """`N` or `MIN:MAX`; ValueError naming `flag` when malformed, MIN > MAX or MIN < `least`."""
        m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
        if m is None:
            raise ValueError(f"{flag}: expected N or MIN:MAX, got {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise ValueError(f"{flag}: MIN {lo} > MAX {hi}")
        if lo < least:
            raise ValueError(f"{flag}: must allow at least {least} worker{'s' if least != 1 else ''}, got MIN {lo}")
        return cls(lo, hi)


@dataclass(frozen=True)
class Slo:
    """`--slo ttft=MS,itl=MS`, in seconds here."""

    ttft_s: float
    itl_s: float

    @classmethod
    def parse(cls, text: str, flag: str = "--slo") -> Slo:
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in ("ttft", "itl") or key in values:
                raise ValueError(f"{flag}: expected ttft=MS,itl=MS, got {text!r}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"{flag}: {key}={value!r} is not a number of milliseconds") from None
            if not ms > 0:
                raise ValueError(f"{flag}: {key} must be > 0 ms, got {value}")
            values[key] = ms / 1e3
        if set(values) != {"ttft", "itl"}:
            raise ValueError(f"{flag}: give both ttft=MS and itl=MS, got {text!r}")
        return cls(values["ttft"], values["itl"])


@dataclass(frozen=True)
class PrefillSignals:
    workers: int  # live and starting workers of the pool (not draining)
    queued_tokens: int  # prompt tokens waiting or being prefilled, all workers
    tokens_per_s: float  # measured prefill tokens/s of one worker (0: not measured yet)
    busy: bool = False  # a step of this pool is under way
    growing: bool = False  # that step is a new worker not up yet
    stuck: bool = False  # ... which found no node: the pool cannot grow


@dataclass(frozen=True)
class DecodeSignals:
    workers: int
    running: int  # sequences decoding or reserved, all workers
    slots: int  # batch slots per worker (--max-batch-size)
    kv_use: float  # pages in use / pages, all workers (0..1)
    p90_itl_s: float | None  # over the last interval; None: no tokens streamed
    busy: bool = False
    growing: bool = False
    stuck: bool = False


@dataclass(frozen=True)
class Decision:
    role: Role
    direction: Direction
    reason: Reason
    workers: int  # the pool's size after the step
    source: Role | None = None  # SWITCH: the pool that gives a worker
    detail: str = ""

    def __str__(self) -> str:
        what = f"switch a {self.source.value} worker to {self.role.value}" if self.source else self.direction.value
        return f"planner: {self.role.value} {what} -> {self.workers} ({self.reason.value}: {self.detail})"


@dataclass
class Planner:
    """See the module docstring. `ranges` holds a range for each pool the planner sizes."""

    ranges: dict[Role, PoolRange]
    slo: Slo
    down_ticks: int = 2  # ticks in a row a pool must be idle before it shrinks
    low_water: float = 0.5  # shrink only if the SLO holds at this fraction of the target with one worker fewer
    high_use: float = 0.9  # grow above this share of batch slots or KV pages in use
    low_use: float = 0.6  # shrink only if what runs fits one worker fewer at this share
    _idle: dict[Role, int] = field(default_factory=dict)

    def tick(self, prefill: PrefillSignals, decode: DecodeSignals) -> list[Decision]:
        sig: dict[Role, PrefillSignals | DecodeSignals] = {Role.PREFILL: prefill, Role.DECODE: decode}
        wants = {Role.PREFILL: self._prefill(prefill), Role.DECODE: self._decode(decode)}
        sizes = {role: s.workers for role, s in sig.items()}
        pairs = ((Role.DECODE, Role.PREFILL), (Role.PREFILL, Role.DECODE))
        for role, other in pairs:  # a pool waiting for a worker holds the other's shrink: that worker may switch
            if sig[role].growing and _is(wants[other], Direction.DOWN):
                wants[other] = None
        out = []
        for role, other in pairs:
            if role not in self.ranges:
                continue
            want = wants[role]
            at_max = _is(want, Direction.UP) and sizes[role] >= self.ranges[role].max
            if sig[role].stuck or at_max:  # it must grow and cannot: a worker of the other pool may switch
                if self._can_give(other, sizes, wants, sig):
                    why = want.detail if want is not None else "its new worker found no node"
                    out.append(Decision(role, Direction.SWITCH, Reason.NO_NODE, sizes[role] + 1, other, why))
                    wants[other] = None
                continue
            if want is not None:
                out.append(want)
        return out

    def _can_give(self, role: Role, sizes: dict[Role, int], wants: dict[Role, Decision | None], sig: dict) -> bool:
        r = self.ranges.get(role)
        if r is None or sizes[role] <= r.min or sig[role].growing:
            return False
        return wants[role] is None or wants[role].direction is Direction.DOWN

    def _bounds(self, role: Role, workers: int) -> Decision | None:
        r = self.ranges[role]
        if workers < r.min:
            return Decision(role, Direction.UP, Reason.BELOW_MIN, workers + 1, detail=f"{workers} < MIN {r.min}")
        if workers > r.max:
            return Decision(role, Direction.DOWN, Reason.ABOVE_MAX, workers - 1, detail=f"{workers} > MAX {r.max}")
        return None

    def _step(self, role: Role, workers: int, up: tuple[Reason, str] | None, idle: str | None) -> Decision | None:
        """Grow at once on `up`; shrink after `down_ticks` idle ticks in a row (`idle` says why it may)."""
        r = self.ranges[role]
        if up is not None:
            self._idle[role] = 0
            if workers < r.max:
                return Decision(role, Direction.UP, up[0], workers + 1, detail=up[1])
            return Decision(role, Direction.UP, up[0], workers, detail=up[1] + f" (at MAX {r.max})")
        if idle is None or workers <= r.min:
            self._idle[role] = 0
            return None
        self._idle[role] = self._idle.get(role, 0) + 1
        if self._idle[role] < self.down_ticks:
            return None
        self._idle[role] = 0
        return Decision(role, Direction.DOWN, Reason.IDLE, workers - 1, detail=idle)

    def _prefill(self, s: PrefillSignals) -> Decision | None:
        if Role.PREFILL not in self.ranges or s.busy:
            return None
        if (bound := self._bounds(Role.PREFILL, s.workers)) is not None:
            return bound
        if s.tokens_per_s <= 0:
            return None  # nothing measured yet: no basis to move
        ttft = s.queued_tokens / (max(s.workers, 1) * s.tokens_per_s)
        up = (
            (Reason.TTFT, f"queue {s.queued_tokens} tokens: predicted TTFT {ttft * 1e3:.0f} ms")
            if (ttft > self.slo.ttft_s)
            else None
        )
        fewer = s.queued_tokens / (max(s.workers - 1, 1) * s.tokens_per_s)
        idle = (
            f"predicted TTFT with one worker fewer {fewer * 1e3:.0f} ms"
            if (fewer < self.low_water * self.slo.ttft_s)
            else None
        )
        return self._step(Role.PREFILL, s.workers, up, idle)

    def _decode(self, s: DecodeSignals) -> Decision | None:
        if Role.DECODE not in self.ranges or s.busy:
            return None
        if (bound := self._bounds(Role.DECODE, s.workers)) is not None:
            return bound
        capacity = max(s.workers, 1) * s.slots
        up: tuple[Reason, str] | None = None
        if s.p90_itl_s is not None and s.p90_itl_s > self.slo.itl_s:
            up = (Reason.ITL, f"p90 ITL {s.p90_itl_s * 1e3:.0f} ms")
        elif s.running > self.high_use * capacity:
            up = (Reason.SLOTS, f"{s.running} of {capacity} batch slots")
        elif s.kv_use > self.high_use:
            up = (Reason.KV, f"KV {s.kv_use:.0%} in use")
        fewer = max(s.workers - 1, 1)
        fits = s.running <= self.low_use * fewer * s.slots and s.kv_use * s.workers <= self.low_use * fewer
        fast = s.p90_itl_s is None or s.p90_itl_s < self.low_water * self.slo.itl_s
        idle = f"{s.running} running fit {fewer} workers" if (fits and fast) else None
        return self._step(Role.DECODE, s.workers, up, idle)


def _is(d: Decision | None, direction: Direction) -> bool:
    return d is not None and d.direction is direction


class RecentSignals:
    """What the planner reads of the recent past, fed by the router's metrics as tokens stream and prefills end:
    inter-token gaps and prefill rates, with their times. Any thread may add; the planner's thread reads."""

    def __init__(self, horizon_s: float = 300.0) -> None:
        self.horizon_s = horizon_s
        self._lock = threading.Lock()
        self._gaps: collections.deque[tuple[float, float]] = collections.deque()  # (time, gap s)
        self._prefills: collections.deque[tuple[float, int, float]] = collections.deque()  # (time, tokens, s)

    def add_gap(self, now: float, gap_s: float) -> None:
        with self._lock:
            self._gaps.append((now, gap_s))
            self._trim(now)

    def add_prefill(self, now: float, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._prefills.append((now, tokens, seconds))
                self._trim(now)

    def _trim(self, now: float) -> None:
        for q in (self._gaps, self._prefills):
            while q and q[0][0] < now - self.horizon_s:
                q.popleft()

    def p90_itl(self, since: float) -> float | None:
        """The 90th percentile of the gaps streamed since `since` (None: none)."""
        with self._lock:
            gaps = sorted(g for t, g in self._gaps if t >= since)
        return gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))] if gaps else None

    def prefill_rate(self) -> float:
        """Prompt tokens per second of prefill work on one worker, over the horizon (0: none measured)."""
        with self._lock:
            tokens = sum(n for _, n, _ in self._prefills)
            seconds = sum(s for _, _, s in self._prefills)
        return tokens / seconds if seconds > 0 else 0.0
