"""`PrefillWorker`: a prefill engine in a process of its own (the router hosts it as a Ray actor; tests may too).

Lifecycle:
  1. `PrefillWorker(options)` opens the model (compiled library from the cache), starts the engine thread.
  2. `prefill(req, kv_target)` / `prefill_stream(...)`: blocks (or streams) until the request's KV reached the
     decode worker at `kv_target`, or failed; many calls run concurrently (a threaded actor).
  3. `cancel(request_id)` at any time; `load()` for placement; `shutdown()` releases everything.
Methods take and return the frozen dataclasses of `prefill_worker.messages` (picklable)."""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvtransfer.runtime_io import make_sender
from llama_relax.generation import TokenEvent
from llama_relax.models import open_model
from llama_relax.runtime import KVCacheConfig
from prefill_worker.engine import PrefillEngine
from prefill_worker.messages import ErrorKind, GenerationRequest, PrefillResult, RequestError, WorkerOptions


def open_worker_model(options: WorkerOptions):
    """Open the model for a worker process (all cores for TVM's pool unless TVM_NUM_THREADS says otherwise)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from llama_relax.compile import resolve_target

    kv = KVCacheConfig(options.max_batch_size, options.max_total_seq_len, options.prefill_chunk_size)
    return open_model(
        Path(options.model) if options.model else None, dtype=options.dtype, target=resolve_target(options.target),
        cache_dir=Path(options.cache_dir) if options.cache_dir else None, kv=kv, quiet=True,
    )  # fmt: skip


class HostedEngine:
    """What every worker process offers the router besides its own calls: cancel, load, ping, shutdown.
    Subclasses set `self.model` (an `OpenModel`) and `self.engine` (a started `EngineLoop` with `cancel`/`load`)."""

    role = "worker"
    model: Any
    engine: Any

    def cancel(self, request_id: str) -> bool:
        return self.engine.cancel(request_id)

    def load(self) -> dict[str, int]:
        info = self.engine.load()
        info["sequences"] = self.engine.call(lambda: len(self.model.runtime.sequence_ids()))
        return info

    def ping(self) -> str:
        if self.engine.error is not None:
            raise RuntimeError(f"{self.role} engine is broken: {self.engine.error}")
        return "ok"

    def shutdown(self) -> None:
        self.engine.close()
        self.model.close()


class PrefillWorker(HostedEngine):
    role = "prefill"

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.model = open_worker_model(options)
        self.engine = PrefillEngine(
            self.model.runtime, self.model.tokenizer, make_sender(self.model.runtime), max_queue=options.max_queue,
            max_seqs=options.max_batch_size, transfer_timeout_s=options.transfer_timeout_s,
        )  # fmt: skip
        self.engine.start()

    def prefill(self, req: GenerationRequest, kv_target: str) -> PrefillResult:
        *_, last = self.prefill_stream(req, kv_target)
        return last

    def prefill_stream(self, req: GenerationRequest, kv_target: str) -> Iterator[TokenEvent | PrefillResult]:
        """Yields the first token's event as soon as it is sampled (unless admission failed), then the result."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        admission = self.engine.submit(req, kv_target, out.put, out.put)
        if not admission.ok:
            yield PrefillResult(req.request_id, None, RequestError(req.request_id, ErrorKind.BUSY, admission.reason))
            return
        while True:
            item = out.get()
            yield item
            if isinstance(item, PrefillResult):
                return

    def shutdown(self) -> None:
        super().shutdown()
        self.engine.sender.close()
