"""Transport-neutral roles for moving a `KVPayload` from a prefill worker to a decode worker.

Call order (sender side, prefill worker): export K/V -> `make_payload` -> `KVSender.send(...)` (blocking) -> on a
failed result free nothing remote, just retry or fail the request; `close()` once at shutdown.
Call order (receiver side, decode worker): `KVReceiver(sink, ...)` -> `start()` (returns the address to publish)
-> the transport calls `sink(header, k, v)` once per complete, verified payload -> `stop()` at shutdown.
Implementations: `grpc_transport` (host memory over gRPC), `nccl_transport` (GPU-to-GPU; header over gRPC).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from kvtransfer.payload import ErrorCode, KVHeader, KVPayload


class ImportSink(Protocol):
    """Imports one verified payload into the decode worker's KV cache; raises on failure.

    Called from a transport thread (for gRPC: a server worker thread), possibly from several at once. It must
    hand the work to the thread that owns the model runtime and block until the import finished (or failed):
    the receiver acks the sender only after the sink returned. `k`, `v` ([layers, end-begin, kv_heads,
    head_dim], header.dtype; arrays, or read-only `LayerSlabs` views of the received chunks, indexed by layer)
    are fresh per transfer and owned by the sink from the call on; the transport never reuses or mutates them. A `PayloadError` becomes an ack with its code and message (e.g.
    SHAPE_MISMATCH when the token range does not fit the local sequence); any other exception an IMPORT_FAILED ack
    carrying "Type: message". Either way the sink must leave the cache as it was.
    """

    def __call__(self, header: KVHeader, k: np.ndarray, v: np.ndarray) -> None: ...


@dataclass(frozen=True)
class TransferResult:
    """Outcome of one `KVSender.send`: never an exception for remote or transport errors.

    `nbytes` counts payload bytes the receiver acknowledged (0 when it rejected the header, the bytes sent
    so far when the transfer was cut short); `transfer_s` is the sender's wall time for the whole call;
    `import_s` the receiver's time inside its sink (0 when the sink did not run).
    """

    ok: bool
    error: ErrorCode | None
    message: str
    nbytes: int
    transfer_s: float
    import_s: float = 0.0

    @classmethod
    def failure(cls, error: ErrorCode, message: str, nbytes: int = 0, transfer_s: float = 0.0) -> TransferResult:
        return cls(ok=False, error=error, message=message, nbytes=nbytes, transfer_s=transfer_s)


class CancelResult(str, Enum):
    """What `KVSender.cancel(request_id)` did.

    REQUESTED: a transfer with that id was in flight and is being aborted; its `send` returns a CANCELLED result
    unless the receiver had already acked (then it returns that ack). A cancel before the sender committed (sent
    its last chunk) guarantees nothing is imported. After the commit it is best effort: the receiver skips the
    import if it notices the abort in time, else imports and, if it notices afterwards, reports the orphan
    (`GrpcKVReceiver(on_orphaned=...)`); the decode side should also expire KV nobody claims.
    NOT_FOUND: no transfer with that id is in flight (never started, or already finished).
    """

    REQUESTED = "REQUESTED"
    NOT_FOUND = "NOT_FOUND"


class KVSender(ABC):
    """Sends payloads to receivers; thread-safe, one instance per process (it caches connections per target).

    Memory: `send` reads `payload.k`/`payload.v` in place (zero-copy views) until it returns; the caller must not
    mutate them before that, and may free them afterwards.
    """

    @abstractmethod
    def send(self, payload: KVPayload, target: str, timeout_s: float) -> TransferResult:
        """Push `payload` to the receiver at `target` and block until it acked the import, failed or timed out."""

    @abstractmethod
    def cancel(self, request_id: str) -> CancelResult:
        """Abort the in-flight `send` of `payload.header.request_id`; callable from any thread."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; in-flight sends fail with CANCELLED or UNAVAILABLE. Idempotent."""


class KVReceiver(ABC):
    """Accepts payloads and imports each through its `ImportSink`; acks each sender only after the sink returned.

    A payload is validated (header against the local layout, then every chunk) before the sink sees it: the sink
    is never called with bad, partial or cancelled data.
    """

    @abstractmethod
    def start(self) -> str:
        """Start serving; returns the address senders use as `target` (e.g. "127.0.0.1:50123")."""

    @abstractmethod
    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting; waits up to `grace_s` for in-flight transfers (None: abort them now). Idempotent."""
