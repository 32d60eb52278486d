"""Typed messages every worker and the router share: requests in, outcomes out, and the workers' control plane.

Frozen dataclasses and Enums only (picklable across Ray); the router converts them to and from protobuf in one
place (`router.convert`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.faults import FaultPlan
from engine.speculation import SpecMode
from kvtransfer.auth import InternalTLS
from llama_relax.generation import TokenEvent
from llama_relax.sampling import SamplingParams


class Role(enum.Enum):
    """What a worker process does; also the Ray custom resource its actor is placed on."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"

    @property
    def stage_resource(self) -> str:
        """The Ray custom resource one pipeline stage of such a worker takes (nodes for pipelines declare it)."""
        return f"{self.value}_stage"


class StagePlacement(enum.Enum):
    """How a pipelined worker's stage actors are placed: its placement group's strategy."""

    PACK = "pack"  # as few nodes as fit (one node when it has room): hand-offs stay on the node
    SPREAD = "spread"  # one stage per node where there are nodes enough


class ErrorKind(enum.Enum):
    """Why a request ended without finishing normally (maps to a gRPC status at the edge, `router.convert`)."""

    INVALID = "invalid"  # bad input, a duplicate request id, a prompt that can never fit: INVALID_ARGUMENT
    BUSY = "busy"  # queue, batch or pages full right now: RESOURCE_EXHAUSTED
    UNAVAILABLE = "unavailable"  # no live worker in a pool, or the worker died: UNAVAILABLE
    TRANSFER_FAILED = "transfer_failed"  # the KV never reached the decode worker: UNAVAILABLE
    EVICTED = "evicted"  # pages ran out mid-generation: RESOURCE_EXHAUSTED
    CANCELLED = "cancelled"  # the client went away: CANCELLED
    INTERNAL = "internal"  # a failure inside a worker: INTERNAL


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the workers see it: validated token ids and sampling params with a concrete seed.

    `resume_ids` are output tokens the client already received (a migrated request): the worker computes the KV
    of `prompt_ids + resume_ids`, replays `resume_ids` through the sampler's stop/detokenizer state without
    emitting them, and continues with output token `len(resume_ids)` (sampling is keyed by (seed, step), so the
    continuation equals the unfailed run's)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    resume_ids: tuple[int, ...] = ()
    traceparent: str = ""  # W3C trace context of the router's span for this request ("": not traced)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids: the prompt is empty")
        if len(self.resume_ids) >= self.params.max_tokens:
            raise ValueError("resume_ids: the request already produced all of its tokens")

    @property
    def token_ids(self) -> tuple[int, ...]:
        """What the KV cache holds before the next output token: the prompt plus the tokens already produced."""
        return self.prompt_ids + self.resume_ids


@dataclass(frozen=True)
class RequestError:
    """Terminal outcome of a request that did not finish normally."""

    request_id: str
    kind: ErrorKind
    message: str


Output = TokenEvent | RequestError  # one item of a request's stream


def is_terminal(item: Output) -> bool:
    """The last item of a stream: an error, or a token with a finish reason."""
    return isinstance(item, RequestError) or item.finish_reason is not None


@dataclass(frozen=True)
class Admission:
    """A worker's answer to a request: admitted (`kind is None`), or refused with the kind and the reason."""

    kind: ErrorKind | None = None
    reason: str = ""
    cached_tokens: int = 0  # leading prompt tokens whose KV the worker already holds (its prefix cache)

    @property
    def ok(self) -> bool:
        return self.kind is None

    @classmethod
    def refuse(cls, kind: ErrorKind, reason: str) -> Admission:
        return cls(kind, reason)

    def error(self, request_id: str) -> RequestError:
        if self.kind is None:
            raise ValueError("an admitted request has no error")
        return RequestError(request_id, self.kind, self.reason)


ADMITTED = Admission()


@dataclass(frozen=True)
class ChunkTiming:
    """One prefill forward that computed tokens [begin, end) of a request: its wall-clock span (epoch ns, for
    traces: the router makes a `prefill_chunk` span of it)."""

    start_ns: int
    end_ns: int
    begin: int
    end: int


@dataclass(frozen=True)
class PrefillResult:
    """What the prefill worker reports once the KV reached the decode worker (or failed to).

    `first` is the first output token's event (TTFT is when it was sampled; it also travelled in the KV header, so
    the decode worker starts on import); `error` is set on failure, and then the decode worker holds no KV."""

    request_id: str
    first: TokenEvent | None
    error: RequestError | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    kv_bytes: int = 0
    transfer_retries: int = 0  # sends retried after a transport failure (at most one)
    cached_tokens: int = 0  # leading prompt tokens the prefill worker took from its prefix cache (not computed)
    export_s: float = 0.0  # KV read out of the cache into the payload
    import_s: float = 0.0  # the decode worker's import (reported in its ack); `transfer_s` includes it
    tail_s: float = 0.0  # the end of prefill until the ack: what the decode side waited for after the first token
    kv_pieces: int = 0  # KV pieces sent (one per prefill chunk when streamed)
    chunks: tuple[ChunkTiming, ...] = ()  # the forwards that computed the prompt, in order

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker process opens its model and sizes its engine (`pdserve serve` checks the flags it comes from
    once, in `router.config.ServeConfig`)."""

    model: str  # HF dir or .gguf
    cache_dir: str  # compiled libraries
    dtype: str = "float32"
    target: str = "llvm"
    quantization: str = "auto"  # see llama_relax.quantization (auto: gguf for a .gguf file, else none)
    kv_cache_dtype: str = "auto"  # see llama_relax.kv_dtype (auto: float16)
    # required on internal gRPC calls (kvtransfer.auth); serve generates one per cluster; never printed
    cluster_token: str = field(default="", repr=False)
    internal_tls: InternalTLS | None = field(default=None, repr=False)  # TLS of the internal channels, if any
    max_batch_size: int = 16  # requests an engine holds at once (and sequences per forward)
    max_total_seq_len: int = 8192  # tokens the KV cache holds at once (all sequences)
    prefill_chunk_size: int = 512  # tokens per prefill forward
    max_queue: int = 64
    output_slice: int = 16  # decode-side reservation: prompt + this many output tokens
    kv_host: str = "127.0.0.1"
    kv_lease_s: float = 30.0  # exported KV not acked, or a reservation whose KV never came, is freed after this
    prefix_cache: bool = True  # keep finished sequences' KV and reuse it for prompts that start the same way
    kv_stream: bool = True  # send each prefill chunk's KV while the next computes (else one piece at the end)
    kv_stream_tail: int = 64  # a streamed prompt's last tokens get their own forward (0: no split)
    speculative: SpecMode = SpecMode.OFF  # decode: draft tokens (engine.speculation) and verify them in one forward
    num_speculative_tokens: int = 8  # the largest draft per sequence and step
    faults: FaultPlan = field(default_factory=lambda: FaultPlan())  # fault injection (tests and drills only)
    stages: int = 1  # pipeline stages: > 1 runs the layers in that many stage actors (engine.stage_actors)
    stage_placement: StagePlacement = StagePlacement.PACK


@dataclass(frozen=True)
class StageInfo:
    """One pipeline stage of a worker: its layers, where it serves, its process, its share of the KV cache."""

    index: int
    first_layer: int
    num_layers: int
    address: str
    pid: int
    node: str = ""  # the Ray node it runs on
    kv_cache_bytes: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """What does not change while a worker process lives; learned once per process (`incarnation`)."""

    role: Role
    incarnation: str  # unique per process start: a new one means the worker was restarted
    pid: int
    kv_address: str  # where prefill workers push KV ("" for roles that receive none)
    kv_dtype: str = ""  # the KV cache's element type (llama_relax.kv_dtype)
    kv_bytes_per_token: int = 0  # K and V of one token, all layers
    kv_cache_bytes: int = 0  # the whole paged KV cache (every page, all layers)
    stages: tuple[StageInfo, ...] = ()  # a pipelined worker's stages, in order (empty: one process)


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's current load, the same fields for every role (0 where a role has none)."""

    incarnation: str
    queued: int = 0  # requests waiting to be prefilled here
    queued_tokens: int = 0  # their prompt tokens not yet computed
    reserved: int = 0  # decode reservations waiting for their KV
    transferring: int = 0  # prefilled requests whose KV is being sent
    running: int = 0  # sequences decoding
    sequences: int = 0  # requests' sequences in the KV cache (the prefix cache's own are not counted)
    free_pages: int = 0
    total_pages: int = 0
    max_batch_seen: int = 0  # the largest decode batch so far (observability, tests)
    lease_expired: int = 0  # KV exports / reservations freed by their lease so far (a counter)
    steps: int = 0  # engine steps that did work so far (a counter: progress)
    cached_pages: int = 0  # pages held by the prefix cache (free + cached == total when nothing runs)
    cached_prefixes: tuple[int, ...] = ()  # page hashes of every cached prefix (`engine.prefix_cache.page_hashes`)
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache so far (a counter)
    prefix_queried_tokens: int = 0  # prompt tokens looked up in it so far (a counter)
    spec_draft_tokens: int = 0  # draft tokens verified so far (a counter)
    spec_accepted_tokens: int = 0  # of those, accepted (a counter)
