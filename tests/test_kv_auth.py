"""The cluster token on internal gRPC services (kvtransfer.auth), over real gRPC on 127.0.0.1: a push with the
token is imported; one with a wrong token, or none, is refused UNAUTHENTICATED before any byte of it is read, and
nothing is imported. Serve hands every worker the same random token."""

from __future__ import annotations

import pytest
from test_kv_grpc import FP, RecordingSink, _payload

from kvtransfer.auth import TokenInterceptor, new_cluster_token
from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.payload import ErrorCode


@pytest.fixture
def guarded():
    sink, token = RecordingSink(), new_cluster_token()
    rx = GrpcKVReceiver(sink, expected_fingerprint=FP, token=token)
    address = rx.start()
    yield sink, token, address
    rx.stop()


@pytest.mark.parametrize("sent", ["right", "wrong", "none"])
def test_push_needs_the_cluster_token(guarded, sent):
    sink, token, address = guarded
    use = {"right": token, "wrong": new_cluster_token(), "none": ""}[sent]
    sender = GrpcKVSender(token=use)
    try:
        result = sender.send(_payload(), address, 30)
    finally:
        sender.close()
    if sent == "right":
        assert result.ok and len(sink.calls) == 1
        return
    assert not result.ok and result.error is ErrorCode.UNAUTHENTICATED, result
    # refused by the interceptor before the handler: the receiver read nothing and imported nothing (the sender
    # may have queued some chunks before the refusal reached it)
    assert sink.calls == [] and not sink.entered.is_set()


def test_token_rules():
    assert new_cluster_token() != new_cluster_token() and len(new_cluster_token()) >= 40
    with pytest.raises(ValueError, match="must not be empty"):
        TokenInterceptor("")


def test_serve_gives_every_worker_one_fresh_token():
    """`pdserve serve` generates a token per start and puts it in every worker's options, never in their repr."""
    from test_serve_config import config

    a, b = config("--model", "/tmp/m.gguf"), config("--model", "/tmp/m.gguf")
    assert a.cluster_token and a.cluster_token != b.cluster_token
    opts = a.worker_options()
    assert opts.cluster_token == a.cluster_token and a.cluster_token not in repr(opts)
