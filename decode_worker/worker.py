"""`DecodeWorker` and `ColocatedWorker`: decode engines in a process of their own (Ray actors under the router).

DecodeWorker lifecycle: `DecodeWorker(options)` opens the model, starts the engine and the KV receiver (its
address is in `describe()`) -> per request `reserve(req)` streams the `Admission`, then (admitted) the request's
events: a prefill worker pushes the KV with the first token in its header, the engine starts the sequence on
import, and the events after token 1 follow until the terminal one. `prefill_local(request_id)` prefills the
reservation here instead (a short uncached part, or no prefill worker alive): the same stream then carries every
event. `cancel(request_id)` at any time. ColocatedWorker: the same without a KV receiver (always `prefill_local`).
They implement `engine.protocols.DecodeAPI`, with the frozen dataclasses of `engine.messages`."""

from __future__ import annotations

from collections.abc import Iterator

from decode_worker.engine import DecodeEngine
from engine.faults import FaultInjector
from engine.hosting import HostedEngine, internal_host, open_worker_model
from engine.messages import Admission, GenerationRequest, Output, Role, WorkerOptions
from engine.stage_actors import StagedModel
from engine.staged_runtime import StagedRuntime
from kvtransfer.runtime_io import make_receiver
from kvtransfer.transport import KVReceiver
from llama_relax.models import OpenModel


def start_decode(
    model: OpenModel | StagedModel, options: WorkerOptions, role: Role
) -> tuple[DecodeEngine, KVReceiver | None, str]:
    """A decode (or colocated) engine on `model`, not yet started, and for DECODE its started KV receiver and the
    address it publishes: the receiver's, or with pipeline stages the route to them (`kvtransfer.route`)."""
    engine = DecodeEngine(
        model.runtime, model.tokenizer, options, faults=FaultInjector(options.faults), name=role.value
    )
    if role is not Role.DECODE:
        return engine, None, ""
    receiver, address = make_receiver(
        model.runtime,
        engine.import_kv,
        internal_host(options),
        0,
        engine.orphaned,
        options.cluster_token,
        options.internal_tls,
    )
    if isinstance(model.runtime, StagedRuntime):
        address = model.runtime.kv_route(address)
    return engine, receiver, address


def reserve_events(engine: DecodeEngine, req: GenerationRequest) -> Iterator[Admission | tuple[Output, ...]]:
    """The admission, then the request's events in chunks (`OutputStream.chunks`: one Ray item per step)."""
    admission, stream = engine.reserve(req)
    yield admission
    if stream is not None:
        yield from stream.chunks()


class DecodeWorker(HostedEngine):
    role = Role.DECODE

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__()
        self.options = options
        self.model = open_worker_model(options, self.role)
        try:
            self.engine, self.receiver, self._kv_address = start_decode(self.model, options, self.role)
        except BaseException:  # a pipelined worker's stage actors go with it
            self.model.close()
            raise
        self._host(self.engine)

    def kv_address(self) -> str:
        return self._kv_address

    def reserve(self, req: GenerationRequest) -> Iterator[Admission | tuple[Output, ...]]:
        yield from reserve_events(self.engine, req)

    def prefill_local(self, request_id: str) -> Admission:
        return self.engine.prefill_local(request_id)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.stop(0)
        super().shutdown()


class ColocatedWorker(DecodeWorker):
    """A decode worker without a KV receiver: the router reserves, then calls `prefill_local`."""

    role = Role.COLOCATED
