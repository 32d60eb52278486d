"""The gRPC frontend: `pdserve.v1.Generation` (streaming Generate, GetModelInfo, GetClusterStatus), the standard
health service and server reflection, bound to 127.0.0.1 unless told otherwise.

Each Generate runs on a server thread: validate (INVALID_ARGUMENT naming the field) -> `Router.generate` -> one
response per token. A client that cancels, disconnects or passes its deadline triggers `Router.cancel`, which makes
both workers drop the request and free its pages."""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtransfer.net import host_port, message_limits
from protos import generate_pb2 as pb
from protos import generate_pb2_grpc as pb_grpc
from router.auth import ApiKey
from router.convert import STATUS_FOR_ERROR, InvalidArgument, ModelLimits, event_to_pb, final_to_pb, request_from_pb
from router.metrics import Metrics
from router.record import Outcome, RouterError
from router.router import Done, Router

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class ServedModel:
    name: str
    dtype: str
    limits: ModelLimits
    num_hidden_layers: int
    hidden_size: int
    tokenizer: object | None


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model: ServedModel, metrics: Metrics) -> None:
        self.router = router
        self.model = model
        self.metrics = metrics

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        """Validate, then one response per token; the last carries usage and timings. The router records every
        metric and the trace; this only converts."""
        arrival = time.monotonic()
        try:
            req = request_from_pb(request, self.model.limits, self.model.tokenizer)
        except InvalidArgument as e:
            self.metrics.count(Outcome.INVALID)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        context.add_callback(lambda: self.router.cancel(req.request_id))  # cancel / disconnect / deadline
        remaining = context.time_remaining()
        deadline = arrival + remaining if remaining is not None else None
        traceparent = dict(context.invocation_metadata() or ()).get("traceparent", "")
        final, first = None, True
        try:
            for item in self.router.generate(req, deadline, arrival, str(traceparent)):
                if isinstance(item, Done):
                    yield final_to_pb(final or pb.GenerateResponse(request_id=req.request_id), item.record)
                    continue
                msg = event_to_pb(req.request_id, item)
                if first:
                    msg.prompt_token_ids.extend(req.prompt_ids)
                    first = False
                if not context.is_active():
                    return
                if item.finish_reason is None:
                    yield msg
                else:
                    final = msg  # sent together with usage and timings once the router is done
        except RouterError as e:
            context.abort(STATUS_FOR_ERROR[e.kind], e.client_message)
        except Exception:  # a bug in this front: INTERNAL with an id to find it in the log, never a traceback
            e = RouterError.bug(req.request_id)
            context.abort(STATUS_FOR_ERROR[e.kind], e.client_message)

    def GetModelInfo(self, request, context):
        m = self.model
        return pb.ModelInfo(
            model=m.name,
            dtype=m.dtype,
            vocab_size=m.limits.vocab_size,
            context_window_size=m.limits.context_window_size,
            num_hidden_layers=m.num_hidden_layers,
            hidden_size=m.hidden_size,
            mode=self.router.mode.value,
            has_tokenizer=m.tokenizer is not None,
        )

    def GetClusterStatus(self, request, context):
        out = pb.ClusterStatus()
        for w in self.router.pools.workers:
            out.workers.append(
                pb.WorkerStatus(
                    name=w.name,
                    role=w.role.value,
                    alive=w.alive,
                    queued=w.load.queued,
                    running=w.load.running,
                    free_pages=w.load.free_pages,
                    total_pages=w.load.total_pages,
                    queued_prompt_tokens=w.queued_tokens,
                    restarts=w.restarts,
                    sequences=w.load.sequences,
                    pid=w.info.pid if w.info is not None else 0,
                    reserved=w.load.reserved,
                    cached_pages=w.load.cached_pages,
                    kv_dtype=w.info.kv_dtype if w.info is not None else "",
                    kv_bytes_per_token=w.info.kv_bytes_per_token if w.info is not None else 0,
                    kv_cache_bytes=w.info.kv_cache_bytes if w.info is not None else 0,
                    refused=w.refused,
                    stages=[
                        pb.StageStatus(
                            index=st.index,
                            first_layer=st.first_layer,
                            num_layers=st.num_layers,
                            address=st.address,
                            pid=st.pid,
                            node=st.node,
                            kv_cache_bytes=st.kv_cache_bytes,
                        )
                        for st in (w.info.stages if w.info is not None else ())
                    ],
                )
            )
        return out


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Every call but the health service's needs metadata `authorization: Bearer KEY`, else UNAUTHENTICATED."""

    OPEN = "/grpc.health.v1.Health/"

    def __init__(self, key: ApiKey) -> None:
        self.key = key

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{ApiKey.MISSING} (metadata authorization: Bearer KEY)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self.OPEN):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if self.key.accepts(str(given)):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny


def start_server(
    service: GenerationService,
    host: str = "127.0.0.1",
    port: int = 50051,
    max_workers: int = 64,
    api_key: str | None = None,
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """Start the gRPC server (Generation + health + reflection); returns it, the health servicer and the port.

    Each call holds a thread for its whole stream, so `max_workers` must cover the running requests plus the
    router's admission queue; past it gRPC answers RESOURCE_EXHAUSTED at once instead of queueing calls where
    no bound or deadline of ours applies."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-api"),
        options=message_limits(),
        maximum_concurrent_rpcs=max_workers,
        interceptors=[ApiKeyInterceptor(ApiKey(api_key))] if api_key else [],
    )
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    bind = host_port(host, port)
    bound = server.add_insecure_port(bind)
    if bound == 0:
        raise OSError(f"could not bind {bind}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, bound
