"""`DecodeWorker` and `ColocatedWorker`: engines in a process of their own (Ray actors under the router).

DecodeWorker lifecycle: `DecodeWorker(options)` opens the model and starts the KV receiver (`kv_address()`) ->
per request `reserve(req)` -> (KV arrives from a prefill worker) -> `start_decoding(request_id, first)` ->
`stream(request_id)` yields token events until the terminal one -> `cancel(request_id)` at any time.
ColocatedWorker: `generate(req)` yields every event of a request (prefill and decode on one runtime).
Methods take and return picklable frozen dataclasses."""

from __future__ import annotations

from collections.abc import Iterator

from decode_worker.colocated import ColocatedEngine
from decode_worker.engine import DecodeEngine
from llama_relax.generation import TokenEvent
from prefill_worker.loop import Output, is_terminal
from prefill_worker.messages import ErrorKind, GenerationRequest, RequestError, WorkerOptions
from prefill_worker.scheduler import Admission
from prefill_worker.worker import HostedEngine, open_worker_model


class DecodeWorker(HostedEngine):
    role = "decode"

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.model = open_worker_model(options)
        self.engine = DecodeEngine(self.model.runtime, self.model.tokenizer, max_batch=options.max_batch_size,
                                   output_slice=options.output_slice, kv_host=options.kv_host)  # fmt: skip
        self.engine.start()

    def kv_address(self) -> str:
        return self.engine.kv_address

    def reserve(self, req: GenerationRequest) -> Admission:
        return self.engine.reserve(req)

    def start_decoding(self, request_id: str, first: TokenEvent) -> None:
        self.engine.start_decoding(request_id, first)

    def stream(self, request_id: str) -> Iterator[Output]:
        """Token events after the first, ending with a finish reason or a RequestError."""
        try:
            s = self.engine.stream(request_id)
        except KeyError as e:
            yield RequestError(request_id, ErrorKind.INTERNAL, str(e))
            return
        yield from s

    def load(self) -> dict[str, int]:
        info = super().load()
        info["max_batch_seen"] = max(self.engine.batch.batch_sizes, default=0)
        return info


class ColocatedWorker(HostedEngine):
    role = "colocated"

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.model = open_worker_model(options)
        self.engine = ColocatedEngine(self.model.runtime, self.model.tokenizer, max_batch=options.max_batch_size,
                                      max_queue=options.max_queue, output_slice=options.output_slice)  # fmt: skip
        self.engine.start()

    def generate(self, req: GenerationRequest) -> Iterator[Output]:
        admission, stream = self.engine.submit(req)
        if not admission.ok:
            yield RequestError(req.request_id, ErrorKind.BUSY, admission.reason)
            return
        for item in stream:
            yield item
            if is_terminal(item):
                return

    def load(self) -> dict[str, int]:
        info = super().load()
        info["max_batch_seen"] = max(self.engine.decode.batch_sizes, default=0)
        return info
