"""Fault injection for drills and the fault suite (`tests/faults/`): make a worker pause at a named stage (so a
real signal can hit it exactly there), or damage one KV stream. Off unless `pdserve serve --inject-fault` asks.

A `FaultPlan` travels in `WorkerOptions`; each worker process builds one `FaultInjector` from it. When a stage
with a planned fault is reached, the injector counts the hit in `<marker_dir>/<stage>` (so a test can wait for
it), then acts. Each fault fires `times` times in the whole drill (a restarted worker does not fire it again),
then the stage runs normally (a retry then succeeds)."""

from __future__ import annotations

import enum
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class Stage(enum.Enum):
    PREFILL_FORWARD = "prefill_forward"  # prefill engine, before a prefill forward
    KV_EXPORT = "kv_export"  # prefill engine, token 1 sampled, before the KV export
    KV_SEND = "kv_send"  # prefill transfer thread, before a KV send
    DECODE_IMPORT = "decode_import"  # decode engine, before a KV import
    DECODE_STEP = "decode_step"  # decode engine, before a decode step


class Action(enum.Enum):
    PAUSE = "pause"  # sleep `seconds` at the stage
    CORRUPT = "corrupt"  # KV_SEND: send a copy of the KV with one byte flipped (the checksums stay the original's)
    TRUNCATE = "truncate"  # KV_SEND: end the stream before its first data chunk, without the commit
    STALL = "stall"  # KV_SEND: pause `seconds` inside the stream, before its first data chunk
    FAIL = "fail"  # raise `InjectedFault` at the stage (in an engine step: a broken engine, which exits)


_STREAM_ACTIONS = {Action.CORRUPT, Action.TRUNCATE, Action.STALL}


class InjectedFault(RuntimeError):
    """Raised by a FAIL fault."""


@dataclass(frozen=True)
class Fault:
    stage: Stage
    action: Action
    seconds: float = 0.0
    times: int = 1

    def __post_init__(self) -> None:
        if self.action in _STREAM_ACTIONS and self.stage is not Stage.KV_SEND:
            raise ValueError(f"fault {self.action.value} applies to stage kv_send only")
        if self.seconds < 0 or self.times < 1:
            raise ValueError("fault: seconds must be >= 0 and times >= 1")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`STAGE:ACTION[:SECONDS][xTIMES]`, e.g. `prefill_forward:pause:5`, `kv_send:corrupt`, `kv_send:stall:3x2`."""
        m = _SPEC.match(text)
        if m is None:
            raise ValueError(f"--inject-fault {text!r}: expected STAGE:ACTION[:SECONDS][xTIMES]")
        try:
            return cls(Stage(m[1]), Action(m[2]), float(m[3] or 0), int(m[4] or 1))
        except ValueError as e:
            raise ValueError(f"--inject-fault {text!r}: {e}") from None


_SPEC = re.compile(r"^(\w+):(\w+?)(?::([0-9.]+))?(?:x([0-9]+))?$")


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()
    marker_dir: str = ""  # where stage markers are written ("": none)


class FaultInjector:
    """One per worker process; thread-safe. `hit(stage)` is called at each stage and returns the fault that fired."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._left = {i: f.times for i, f in enumerate(plan.faults)}
        self._armed: dict[str, Fault] = {}
        self._lock = threading.Lock()

    def hit(self, stage: Stage) -> Fault | None:
        if not self.plan.faults:
            return None
        with self._lock:
            fired = next((i for i, f in enumerate(self.plan.faults) if f.stage is stage and self._left[i] > 0), None)
            if fired is None:
                return None
            fault = self.plan.faults[fired]
            if self.plan.marker_dir and not self._count_hit(fired, fault):
                self._left[fired] = 0  # used up by an earlier process (this worker was restarted)
                return None
            self._left[fired] -= 1
        if fault.action is Action.PAUSE:
            time.sleep(fault.seconds)
        if fault.action is Action.FAIL:
            raise InjectedFault(f"injected fault at {stage.value}")
        return fault

    def _count_hit(self, index: int, fault: Fault) -> bool:
        """Count the hit in `<marker_dir>/<stage>.<index>` (shared by every process of the drill, restarted ones
        too) and touch `<marker_dir>/<stage>`; False when the fault has fired `times` times already."""
        counter = Path(self.plan.marker_dir, f"{fault.stage.value}.{index}")
        hits = int(counter.read_text() or 0) if counter.exists() else 0
        if hits >= fault.times:
            return False
        tmp = counter.with_name(f"{counter.name}.{os.getpid()}")
        tmp.write_text(str(hits + 1))
        os.replace(tmp, counter)
        Path(self.plan.marker_dir, fault.stage.value).touch()
        return True

    def damaged(self, fault: Fault | None, k: np.ndarray) -> np.ndarray:
        """The K array to send for a CORRUPT fault: a copy with one byte flipped; else `k` itself."""
        if fault is None or fault.action is not Action.CORRUPT:
            return k
        bad = np.array(k, copy=True)
        bad.reshape(-1).view(np.uint8)[0] ^= 0xFF
        return bad

    def arm(self, request_id: str, fault: Fault | None) -> None:
        """Make the next stream of `request_id` suffer a TRUNCATE / STALL fault (others need no arming)."""
        if fault is not None and fault.action in (Action.TRUNCATE, Action.STALL):
            with self._lock:
                self._armed[request_id] = fault

    def chunk_hook(self, cancel: Callable[[str], object]) -> Callable[[str, int], None]:
        """The sender's `on_chunk` hook: acts on an armed stream before its first data chunk."""

        def hook(request_id: str, index: int) -> None:
            with self._lock:
                fault = self._armed.pop(request_id, None) if index == 0 else None
            if fault is None:
                return
            if fault.action is Action.STALL:
                time.sleep(fault.seconds)
            else:
                cancel(request_id)

        return hook
