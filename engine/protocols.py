"""The calls the router makes on workers, one typed `Protocol` per role.

The worker classes (`prefill_worker.worker.PrefillWorker`, `decode_worker.worker.DecodeWorker`,
`decode_worker.worker.ColocatedWorker`) implement them in their own process; `router.clients` implements the same
protocols over Ray actor handles, and tests implement them with fakes. A remote implementation raises
`WorkerGone` when the worker process is gone (died, restarting, unreachable) and `WorkerFault` when the call
raised inside the worker; a local one raises neither. Streams end with their terminal item: a `TokenEvent` with a
finish reason or a `RequestError` (`prefill_stream`: a `PrefillResult`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from engine.messages import Admission, GenerationRequest, Output, PrefillResult, Role, WorkerInfo, WorkerLoad
from llama_relax.generation import TokenEvent


class WorkerGone(Exception):
    """The worker process is gone (or not answering): anything it held is lost."""


class WorkerFault(Exception):
    """A call raised inside the worker; `message` is the worker's one-line description (never a traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WorkerAPI(Protocol):
    """What every worker answers."""

    def describe(self) -> WorkerInfo: ...

    def load(self) -> WorkerLoad: ...

    def cancel(self, request_id: str) -> bool: ...

    def ping(self) -> None: ...

    def shutdown(self) -> None: ...

    def switch(self, role: Role) -> WorkerInfo:
        """A worker that can change role (`router.role_worker.RoleWorker`) becomes a `role` worker."""
        ...


class PrefillAPI(WorkerAPI, Protocol):
    def prefill_stream(
        self, req: GenerationRequest, kv_target: str, kv_begin: int = 0
    ) -> Iterator[TokenEvent | PrefillResult]:
        """Prefill `req` (what its prefix cache lacks), yield its first token as soon as it is sampled (unless
        admission failed), push the KV of tokens [kv_begin, n) (with that token in the header) to the decode
        worker at `kv_target`, which holds the ones before, then yield the `PrefillResult`."""
        ...


class DecodeAPI(WorkerAPI, Protocol):
    """A decode worker, or a colocated one (a decode engine that prefills everything itself)."""

    def reserve(self, req: GenerationRequest) -> Iterator[Admission | Output]:
        """Set pages aside for `req`. The first item is the `Admission` (its `cached_tokens`: leading tokens this
        worker already holds, so the KV sent must start there); when admitted, the request's events follow, ending
        with the terminal one: those after token 1 (the KV and token 1 come from a prefill worker), or every event
        once `prefill_local` was called."""
        ...

    def prefill_local(self, request_id: str) -> Admission:
        """Prefill the reserved request here instead of receiving its KV (short uncached part, no prefill worker
        alive, the colocated engine): its `reserve` stream then carries every event, token 1 included."""
        ...
