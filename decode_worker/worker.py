"""`DecodeWorker` and `ColocatedWorker`: decode engines in a process of their own (Ray actors under the router).

DecodeWorker lifecycle: `DecodeWorker(options)` opens the model, starts the engine and the KV receiver (its
address is in `describe()`) -> per request `reserve(req)` -> a prefill worker pushes the KV with the first token
in its header; the engine starts the sequence on import -> `stream(request_id)` yields the token events after the
first until the terminal one -> `cancel(request_id)` at any time. `prefill_local(request_id)` prefills a
reservation here instead (the decode-only fallback when no prefill worker is alive).
ColocatedWorker: `generate(req)` yields every event of a request (prefill and decode on one runtime).
They implement `engine.protocols.DecodeAPI` / `ColocatedAPI`, with the frozen dataclasses of `engine.messages`."""

from __future__ import annotations

from collections.abc import Iterator

from decode_worker.engine import DecodeEngine
from engine.faults import FaultInjector
from engine.hosting import HostedEngine, open_worker_model
from engine.loop import Output
from engine.messages import Admission, GenerationRequest, Role, WorkerOptions
from kvtransfer.runtime_io import make_receiver
from kvtransfer.transport import KVReceiver


class DecodeWorker(HostedEngine):
    role = Role.DECODE

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__()
        self.options = options
        self.model = open_worker_model(options)
        self.engine = DecodeEngine(
            self.model.runtime,
            self.model.tokenizer,
            max_batch=options.max_batch_size,
            output_slice=options.output_slice,
            kv_lease_s=options.kv_lease_s,
            faults=FaultInjector(options.faults),
            name=self.role.value,
            prefix_cache=options.prefix_cache,
        )
        self.receiver: KVReceiver | None = None
        self._kv_address = ""
        if self.role is Role.DECODE:
            self.receiver, self._kv_address = make_receiver(
                self.model.runtime, self.engine.import_kv, options.kv_host, 0, self.engine.orphaned
            )
        self._host(self.engine)

    def kv_address(self) -> str:
        return self._kv_address

    def reserve(self, req: GenerationRequest) -> Admission:
        return self.engine.reserve(req)

    def stream(self, request_id: str) -> Iterator[Output]:
        yield from self.engine.stream(request_id)

    def prefill_local(self, request_id: str) -> Iterator[Output]:
        yield from self.engine.prefill_local(request_id)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.stop(0)
        super().shutdown()


class ColocatedWorker(DecodeWorker):
    """A decode worker without a KV receiver: everything is prefilled here (`prefill_local` after `reserve`, or
    `generate` in one call)."""

    role = Role.COLOCATED

    def generate(self, req: GenerationRequest) -> Iterator[Output]:
        admission, stream = self.engine.submit(req)
        if stream is None:
            yield admission.error(req.request_id)
            return
        yield from stream
