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

from engine.loop import Output
from engine.messages import Admission, GenerationRequest, PrefillResult, WorkerInfo, WorkerLoad
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


class PrefillAPI(WorkerAPI, Protocol):
    def prefill_stream(
        self, req: GenerationRequest, kv_target: str, kv_begin: int = 0
    ) -> Iterator[TokenEvent | PrefillResult]:
        """Prefill `req` (what its prefix cache lacks), yield its first token as soon as it is sampled (unless
        admission failed), push the KV of tokens [kv_begin, n) (with that token in the header) to the decode
        worker at `kv_target`, which holds the ones before, then yield the `PrefillResult`."""
        ...


class DecodeAPI(WorkerAPI, Protocol):
    def reserve(self, req: GenerationRequest) -> Admission:
        """Set pages aside for `req`; its KV and first token will come from a prefill worker. The answer's
        `cached_tokens` says how many leading tokens this worker already holds (its prefix cache): the KV sent
        must start there."""
        ...

    def stream(self, request_id: str) -> Iterator[Output]:
        """The request's events after its first token, ending with the terminal one (claimable once)."""
        ...

    def prefill_local(self, request_id: str) -> Iterator[Output]:
        """Prefill the reserved request here instead of receiving its KV (no prefill worker alive): every event,
        token 1 included, ending with the terminal one (claims the stream)."""
        ...


class ColocatedAPI(DecodeAPI, Protocol):
    """A decode engine that prefills everything itself: the router reserves, then calls `prefill_local`."""

    def generate(self, req: GenerationRequest) -> Iterator[Output]:
        """Prefill and decode `req` here; every event, ending with the terminal one."""
        ...
