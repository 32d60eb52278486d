"""`PrefillWorker`: a prefill engine in a process of its own (the router hosts it as a Ray actor; tests may too).

Lifecycle:
  1. `PrefillWorker(options)` opens the model (compiled library from the cache) and starts the engine thread.
  2. `prefill_stream(req, kv_target)`: streams the first token as soon as it is sampled, then the `PrefillResult`
     once the KV (with that token in its header) reached the decode worker at `kv_target`, or failed; many calls
     run concurrently (a threaded actor).
  3. `cancel(request_id)` at any time; `describe()` / `load()` for placement; `shutdown()` releases everything.
Implements `engine.protocols.PrefillAPI`; takes and returns the frozen dataclasses of `engine.messages`."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from engine.faults import FaultInjector
from engine.hosting import HostedEngine, open_worker_model
from engine.messages import GenerationRequest, PrefillResult, Role, WorkerOptions
from engine.stage_actors import StagedModel
from kvtransfer.nccl_transport import RoutedSender
from kvtransfer.runtime_io import make_sender
from llama_relax.generation import TokenEvent
from llama_relax.models import OpenModel
from prefill_worker.engine import PrefillEngine


def start_prefill(model: OpenModel | StagedModel, options: WorkerOptions) -> tuple[PrefillEngine, RoutedSender]:
    """A prefill engine on `model`, not yet started, and its KV sender."""
    sender = make_sender(model.runtime, options.cluster_token, options.internal_tls)
    faults = FaultInjector(options.faults)
    if options.faults.faults:
        sender.grpc.on_chunk = faults.chunk_hook(sender.cancel)
    return PrefillEngine(model.runtime, model.tokenizer, sender, options, faults=faults), sender


class PrefillWorker(HostedEngine):
    role = Role.PREFILL

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__()
        self.options = options
        self.model = open_worker_model(options, self.role)
        try:
            self.engine, self.sender = start_prefill(self.model, options)
        except BaseException:  # a pipelined worker's stage actors go with it
            self.model.close()
            raise
        self._host(self.engine)

    def prefill_stream(
        self, req: GenerationRequest, kv_target: str, kv_begin: int = 0
    ) -> Iterator[TokenEvent | PrefillResult]:
        yield from prefill_events(self.engine, req, kv_target, kv_begin)

    def shutdown(self) -> None:
        super().shutdown()
        self.sender.close()


def prefill_events(
    engine: PrefillEngine, req: GenerationRequest, kv_target: str, kv_begin: int = 0
) -> Iterator[TokenEvent | PrefillResult]:
    """A prefill's events: the first token as soon as it is sampled, then the `PrefillResult`."""
    out: queue.SimpleQueue[TokenEvent | PrefillResult] = queue.SimpleQueue()
    admission = engine.submit(req, kv_target, out.put, kv_begin)
    if not admission.ok:
        yield PrefillResult(req.request_id, None, admission.error(req.request_id))
        return
    while True:
        item = out.get()
        yield item
        if isinstance(item, PrefillResult):
            return
