"""Typed messages shared by the workers (and, later, the router): requests in, outcomes out.

Frozen dataclasses only; the router converts them to and from protobuf in one place."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from llama_relax.generation import TokenEvent
from llama_relax.sampling import SamplingParams


class ErrorKind(enum.Enum):
    """Why a request ended without finishing normally (maps to gRPC status codes at the edge)."""

    INVALID = "invalid"  # bad input: INVALID_ARGUMENT
    BUSY = "busy"  # queue or pages full: RESOURCE_EXHAUSTED
    TRANSFER_FAILED = "transfer_failed"  # KV never reached the decode worker: UNAVAILABLE (retry elsewhere)
    EVICTED = "evicted"  # pages ran out mid-generation: RESOURCE_EXHAUSTED
    CANCELLED = "cancelled"  # the client went away: CANCELLED
    INTERNAL = "internal"  # a worker-side failure: INTERNAL


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the workers see it: validated token ids and sampling params with a concrete seed."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids: the prompt is empty")


@dataclass(frozen=True)
class RequestError:
    """Terminal outcome of a request that did not finish normally."""

    request_id: str
    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class PrefillResult:
    """What the prefill worker reports once the KV reached the decode worker (or failed to).

    `first` is the first output token's event (TTFT is when it was sampled); `error` is set on failure, in which
    case the decode worker holds nothing for the request."""

    request_id: str
    first: TokenEvent | None
    error: RequestError | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    kv_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker process opens its model and sizes its engine (validated once, where the worker is made)."""

    model: str | None = None  # HF dir or .gguf; None = the bundled default
    cache_dir: str | None = None
    dtype: str = "float32"
    target: str = "llvm"
    max_batch_size: int = 16  # sequences the KV cache holds at once
    max_total_seq_len: int = 8192  # tokens the KV cache holds at once (all sequences)
    prefill_chunk_size: int = 512  # tokens per prefill forward
    max_queue: int = 64
    output_slice: int = 16  # decode-side reservation: prompt + this many output tokens
    kv_host: str = "127.0.0.1"
    transfer_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "max_queue", "output_slice"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
