"""A real OTLP/HTTP trace receiver on 127.0.0.1 (`bench.trace_cost`, and the tracing tests): `POST /v1/traces`
with a protobuf `ExportTraceServiceRequest`, decoded with `opentelemetry-proto`. Spans are kept in arrival order
as plain `Span`s; `close()` stops it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root without a remote parent
    start_ns: int
    end_ns: int
    attributes: dict
    service: str
    status_code: int


def _spans(req: ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in req.resource_spans:
        service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                attrs = {a.key: _value(a.value) for a in s.attributes}
                ids = (s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex())
                out.append(
                    Span(s.name, *ids, s.start_time_unix_nano, s.end_time_unix_nano, attrs, service, s.status.code)
                )
    return out


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    def __init__(self) -> None:
        self._raw: list[bytes] = []
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(body)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    def _take(self, body: bytes) -> None:
        with self._lock:
            self._raw.append(body)  # decoded when read: the receiving thread does no more than it must

    @property
    def spans(self) -> list[Span]:
        """Every span received so far, in arrival order."""
        with self._lock:
            raw, self._raw = self._raw, []
        decoded = [_spans(ExportTraceServiceRequest.FromString(body)) for body in raw]
        with self._lock:
            for spans in decoded:
                self._spans.extend(spans)
            return list(self._spans)

    def trace_of(self, request_id: str) -> list[Span]:
        """Every span of the trace whose root carries `pdserve.request_id == request_id` ([] until it came)."""
        spans = self.spans
        roots = [s for s in spans if s.name == "request" and s.attributes.get("pdserve.request_id") == request_id]
        if not roots:
            return []
        return [s for s in spans if s.trace_id == roots[0].trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
