"""The cluster token every internal gRPC service requires (KV pushes, NCCL set-up; stage hand-offs later).

`pdserve serve` generates one token per cluster (`new_cluster_token`) and hands it to every worker actor in its
options; a sender attaches it as metadata `x-pdserve-cluster-token`, a server's `TokenInterceptor` compares it in
constant time and answers UNAUTHENTICATED, before any handler runs (nothing is read, nothing imported), when it is
wrong or missing. An empty token turns the check off (in-process tools and tests that start their own receiver).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable

import grpc

TOKEN_METADATA = "x-pdserve-cluster-token"
DENIED = "missing or wrong cluster token"


def new_cluster_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a sender attaches (none for an empty token)."""
    return ((TOKEN_METADATA, token),) if token else ()


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the cluster token (constant-time compare) with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a cluster token must not be empty")
        self._expected = token.encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details
    ) -> grpc.RpcMethodHandler | None:
        got = next((v for k, v in details.invocation_metadata or () if k == TOKEN_METADATA), "")
        handler = continuation(details)
        if hmac.compare_digest(str(got).encode(), self._expected) or handler is None:
            return handler
        return _denying(handler)


def _deny(_request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that aborts at once (a streamed request is never read)."""
    if handler.request_streaming and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny)
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny)
    return grpc.unary_unary_rpc_method_handler(_deny)
