"""The worker protocols of `engine.protocols`, implemented over Ray actor handles: the only place the router
touches Ray's call API. Each method names the actor method it calls (no string dispatch), and Ray's failures
become the protocols' errors: an actor that died or does not answer raises `WorkerGone`, an exception raised
inside the worker's method raises `WorkerFault` with a one-line message (never the remote traceback)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from engine.messages import Admission, GenerationRequest, Output, PrefillResult, Role, WorkerInfo, WorkerLoad
from engine.protocols import WorkerFault, WorkerGone
from llama_relax.generation import TokenEvent

MAX_FAULT_CHARS = 300
STREAM_POLL_S = 0.25  # how often a waiting stream checks that its worker is still considered alive


def fault_message(error: BaseException) -> str:
    """One line naming what a worker raised: the original exception's type and message, never a traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
        text = lines[-1] if lines else type(error).__name__
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return text[:MAX_FAULT_CHARS]


class RayWorkerClient:
    """The calls every role answers, on one actor. `call_timeout_s` bounds each blocking control call (a worker
    slower than that is treated as stalled). A stream waits for its next item as long as it takes, unless
    `alive()` turns False meanwhile (the pool monitor gave up on the worker): then it raises `WorkerGone`."""

    def __init__(
        self, ray: Any, handle: Any, name: str, call_timeout_s: float = 30.0, alive: Callable[[], bool] = lambda: True
    ) -> None:
        self.ray = ray
        self.handle = handle
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.alive = alive

    def _get(self, ref: Any, timeout_s: float | None = None) -> Any:
        exc = self.ray.exceptions
        try:
            return self.ray.get(ref, timeout=timeout_s)
        except (exc.RayActorError, exc.GetTimeoutError, exc.ObjectLostError) as e:
            raise WorkerGone(f"{self.name}: {type(e).__name__}") from e
        except exc.RayTaskError as e:
            raise WorkerFault(fault_message(e)) from e

    def _iter(self, refs: Any) -> Iterator[Any]:
        """Items of a streaming actor call, in order."""
        exc = self.ray.exceptions
        try:
            while True:
                ready, _ = self.ray.wait([refs], timeout=STREAM_POLL_S)
                if not ready:
                    if not self.alive():
                        raise WorkerGone(f"{self.name}: stopped answering")
                    continue
                try:
                    ref = next(refs)
                except StopIteration:
                    return
                yield self._get(ref)
        except (exc.RayActorError, exc.ObjectLostError) as e:  # raised by the generator itself
            raise WorkerGone(f"{self.name}: {type(e).__name__}") from e

    def describe(self) -> WorkerInfo:
        return self._get(self.handle.describe.remote(), self.call_timeout_s)

    def load(self) -> WorkerLoad:
        return self._get(self.handle.load.remote(), self.call_timeout_s)

    def cancel(self, request_id: str) -> bool:
        return self._get(self.handle.cancel.remote(request_id), self.call_timeout_s)

    def ping(self) -> None:
        self._get(self.handle.ping.remote(), self.call_timeout_s)

    def shutdown(self) -> None:
        self._get(self.handle.shutdown.remote(), self.call_timeout_s)

    def switch(self, role: Role) -> WorkerInfo:
        """A `RoleWorker` becomes a `role` worker (drained first); what it describes then."""
        return self._get(self.handle.switch.remote(role), self.call_timeout_s)


class RayPrefillClient(RayWorkerClient):
    """`engine.protocols.PrefillAPI` over a `PrefillWorker` actor."""

    def prefill_stream(
        self, req: GenerationRequest, kv_target: str, kv_begin: int = 0
    ) -> Iterator[TokenEvent | PrefillResult]:
        return self._iter(self.handle.prefill_stream.remote(req, kv_target, kv_begin))


class RayDecodeClient(RayWorkerClient):
    """`engine.protocols.DecodeAPI` over a `DecodeWorker` or `ColocatedWorker` actor."""

    def reserve(self, req: GenerationRequest) -> Iterator[Admission | Output]:
        return _flatten(self._iter(self.handle.reserve.remote(req)))  # the call starts now, not at the first next

    def prefill_local(self, request_id: str) -> Admission:
        return self._get(self.handle.prefill_local.remote(request_id), self.call_timeout_s)


def _flatten(items: Iterator[Any]) -> Iterator[Any]:
    """A decode worker's stream: the admission, then chunks of events (`DecodeWorker.reserve`), one by one."""
    for item in items:
        if isinstance(item, tuple):
            yield from item
        else:
            yield item
