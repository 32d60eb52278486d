"""OpenTelemetry traces of requests, exported over OTLP/HTTP (`pdserve serve --otlp-traces-endpoint URL`).

One trace per request, made from its `RequestRecord` (the same record every metric reads, for both fronts):

    request (root, SERVER; parent: the client's W3C `traceparent`, if any)
      queue           the router's admission: arrival until a decode worker reserved pages
      prefill         until token 1; one `prefill_chunk` child per forward that computed the prompt (the prefill
                      worker reports each forward's wall-clock span)
      kv_transfer     the KV hand-off to the decode worker: pieces, bytes, export / wire / import / tail times
      decode          token 1 until the end; its step count
      migration       one per retry of a migrated request: the lost attempt found until the new one's next token

Lifecycle (`Router.generate` calls it): `start(rec)` opens the root span at the request's arrival and
`propagate(req, span)` puts its context into the request the workers get (`GenerationRequest.traceparent`:
the context crosses the Ray actor calls); `end(span, rec)` makes the children from the record's time stamps and
ends the root. A batch processor exports off the request path. Off (no endpoint): every call returns at once and
no OpenTelemetry module is imported, so tracing costs nothing on the hot path."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from engine.messages import GenerationRequest
from router.record import Outcome, RequestRecord, RequestState

log = logging.getLogger(__name__)
SERVICE_NAME = "pdserve"
EXPORT_DELAY_MS = 500  # the batch processor's schedule: spans leave within about this long of a request's end


class Tracer:
    """The router's request tracer; `Tracer()` (no endpoint) is off."""

    def __init__(self, endpoint: str | None = None, service_name: str = SERVICE_NAME) -> None:
        self.endpoint = endpoint
        self._provider: Any = None
        self._tracer: Any = None
        if endpoint is None:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=EXPORT_DELAY_MS)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("pdserve.router")

    def start(self, rec: RequestRecord) -> Any:
        """The request's root span, open from its arrival (None when off)."""
        if self._tracer is None:
            return None
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract({"traceparent": rec.traceparent}) if rec.traceparent else None
        return self._tracer.start_span(
            "request", context=parent, kind=SpanKind.SERVER, start_time=rec.wall_ns(rec.arrival)
        )

    def propagate(self, req: GenerationRequest, span: Any) -> GenerationRequest:
        """`req` carrying the span's W3C context to the workers (unchanged when off)."""
        if span is None:
            return req
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
        return dataclasses.replace(req, traceparent=carrier.get("traceparent", ""))

    def end(self, span: Any, rec: RequestRecord) -> None:
        """Make the children from the record and end the root (nothing when off)."""
        if span is None:
            return
        try:
            self._children(span, rec)
        except Exception:  # a trace must never fail a request
            log.exception("request %s: could not build its trace", rec.request_id)
        outcome = rec.outcome or Outcome.CANCELLED
        span.set_attributes(
            {
                "pdserve.request_id": rec.request_id,
                "pdserve.prompt_tokens": rec.prompt_tokens,
                "pdserve.cached_tokens": min(rec.cached_tokens, rec.prompt_tokens),
                "pdserve.output_tokens": rec.completion_tokens,
                "pdserve.finish_reason": rec.finish_reason,
                "pdserve.outcome": outcome.value,
                "pdserve.attempts": rec.migrations + 1,
            }
        )
        if outcome not in (Outcome.FINISHED, Outcome.CANCELLED):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, outcome.value))
        span.end(end_time=rec.wall_ns(rec.ended_at or rec.last_token_at or rec.arrival))

    def _children(self, root: Any, rec: RequestRecord) -> None:
        from opentelemetry.trace import set_span_in_context

        ctx = set_span_in_context(root)
        end = rec.ended_at or rec.last_token_at or rec.arrival
        ns = rec.wall_ns

        def child(name: str, start_ns: int, end_ns: int, attrs: dict, context=ctx) -> Any:
            s = self._tracer.start_span(name, context=context, start_time=start_ns, attributes=attrs)
            s.end(end_time=max(start_ns, end_ns))
            return s

        st = rec.stamps
        reserved = st.get(RequestState.RESERVED)
        child("queue", ns(rec.arrival), ns(reserved or end), {"pdserve.admission_wait_s": rec.queue_wait_s})
        p = rec.prefill
        prefill_start = st.get(RequestState.PREFILLING)
        if prefill_start is not None:
            first = rec.first_token_at or end
            remote = p is not None
            attrs = {"pdserve.prefill.remote": remote, "pdserve.cached_tokens": rec.cached_tokens}
            if p is not None:
                attrs |= {"pdserve.prefill.chunks": len(p.chunks), "pdserve.prefill.queue_s": p.queue_s}
            prefill = self._tracer.start_span("prefill", context=ctx, start_time=ns(prefill_start), attributes=attrs)
            inner = set_span_in_context(prefill)
            for c in p.chunks if p is not None else ():
                attrs = {"pdserve.tokens.begin": c.begin, "pdserve.tokens.end": c.end}
                child("prefill_chunk", c.start_ns, c.end_ns, attrs, inner)
            prefill.end(end_time=max(ns(prefill_start), ns(first)))
        if p is not None and (p.kv_pieces or p.kv_bytes):
            start = p.chunks[0].end_ns if p.kv_pieces > 1 and p.chunks else ns(st.get(RequestState.KV_TRANSFER, end))
            attrs = {
                "pdserve.kv.pieces": p.kv_pieces,
                "pdserve.kv.bytes": p.kv_bytes,
                "pdserve.kv.export_s": p.export_s,
                "pdserve.kv.wire_s": max(0.0, p.transfer_s - p.import_s),
                "pdserve.kv.import_s": p.import_s,
                "pdserve.kv.tail_s": p.tail_s,
                "pdserve.kv.retries": p.transfer_retries,
            }
            child("kv_transfer", start, ns(rec.prefill_done_at or end), attrs)
        if rec.first_token_at is not None:
            steps = max(0, rec.completion_tokens - 1)  # one token per decode step
            child("decode", ns(rec.first_token_at), ns(end), {"pdserve.decode.steps": steps})
        for i, m in enumerate(rec.migration_log, start=1):
            attrs = {"pdserve.migration.reason": m.reason, "pdserve.migration.tokens_sent": m.tokens_sent}
            child("migration", ns(m.at), ns(m.resumed_at or end), attrs | {"pdserve.migration.attempt": i + 1})

    def shutdown(self) -> None:
        """Export what is left and stop (serve's shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()
