"""The cluster token every internal gRPC service requires (KV pushes, NCCL set-up; stage hand-offs later), and
the optional TLS of those channels.

`pdserve serve` generates one token per cluster (`new_cluster_token`) and hands it to every worker actor in its
options; a sender attaches it as metadata `x-pdserve-cluster-token`, a server's `TokenInterceptor` compares it in
constant time and answers UNAUTHENTICATED, before any handler runs (nothing is read, nothing imported), when it is
wrong or missing. An empty token turns the check off (in-process tools and tests that start their own receiver).

TLS (`--internal-tls-cert/--internal-tls-key`): every internal server serves the one certificate, every sender
trusts exactly it and checks it against the name `pdserve-internal` (whatever address it dials), so one
certificate whose subjectAltName carries `DNS:pdserve-internal` serves a whole cluster; serve reads both files
once and hands their PEM text to the workers.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

TOKEN_METADATA = "x-pdserve-cluster-token"
DENIED = "missing or wrong cluster token"
TLS_NAME = "pdserve-internal"  # the name every internal certificate must carry (subjectAltName DNS)


@dataclass(frozen=True)
class InternalTLS:
    """The internal channels' certificate and key (PEM text); the key is never printed."""

    cert_pem: str
    key_pem: str = field(repr=False)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem.encode(), self.cert_pem.encode())])

    def channel(self, target: str, options: list) -> grpc.Channel:
        """A channel to an internal server that trusts only this certificate, checked as `TLS_NAME`."""
        creds = grpc.ssl_channel_credentials(root_certificates=self.cert_pem.encode())
        return grpc.secure_channel(target, creds, options=[*options, ("grpc.ssl_target_name_override", TLS_NAME)])


def internal_channel(target: str, options: list, tls: InternalTLS | None) -> grpc.Channel:
    """A channel to an internal gRPC service: TLS when the cluster has a certificate, else plain text."""
    return tls.channel(target, options) if tls is not None else grpc.insecure_channel(target, options=options)


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
