"""The cluster token on internal gRPC services (kvtransfer.auth), over real gRPC on 127.0.0.1: a push with the
token is imported; one with a wrong token, or none, is refused UNAUTHENTICATED before any byte of it is read, and
nothing is imported. Serve hands every worker the same random token."""

from __future__ import annotations

import subprocess

import pytest
from test_kv_grpc import FP, RecordingSink, _payload

from kvtransfer.auth import InternalTLS, TokenInterceptor, new_cluster_token
from kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from kvtransfer.payload import ErrorCode
from llama_relax.errors import UserError


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


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for `pdserve-internal` (what every internal certificate must name)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days",
         "1", "-subj", "/CN=pdserve-internal", "-addext", "subjectAltName=DNS:pdserve-internal",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def test_tls_push(cert):
    tls = InternalTLS(cert[0].read_text(), cert[1].read_text())
    sink, token = RecordingSink(), new_cluster_token()
    rx = GrpcKVReceiver(sink, expected_fingerprint=FP, token=token, tls=tls)
    address = rx.start()
    try:
        results = {}
        for name, sender in {
            "tls+token": GrpcKVSender(token=token, tls=tls),
            "tls, no token": GrpcKVSender(tls=tls),
            "plain text": GrpcKVSender(token=token),
        }.items():
            try:
                results[name] = sender.send(_payload(request_id=name), address, 10)
            finally:
                sender.close()
    finally:
        rx.stop()
    assert results["tls+token"].ok
    assert results["tls, no token"].error is ErrorCode.UNAUTHENTICATED
    assert not results["plain text"].ok and results["plain text"].error is ErrorCode.UNAVAILABLE
    assert [h.request_id for h, _, _ in sink.calls] == ["tls+token"]  # the refused ones imported nothing
    assert "PRIVATE" not in repr(tls)


def test_tls_flags(cert):
    from test_serve_config import config

    model = ("--model", "/tmp/m.gguf")
    c = config(*model, "--internal-tls-cert", str(cert[0]), "--internal-tls-key", str(cert[1]))
    assert c.worker_options().internal_tls == c.internal_tls and c.internal_tls.cert_pem.startswith("-----BEGIN")
    assert "PRIVATE" not in repr(c.worker_options())
    for flags, named in (
        (("--internal-tls-cert", str(cert[0])), "--internal-tls-key"),
        (("--internal-tls-key", str(cert[1])), "--internal-tls-cert"),
        (("--internal-tls-cert", str(cert[1]), "--internal-tls-key", str(cert[1])), "--internal-tls-cert"),
        (("--internal-tls-cert", "/nonexistent.pem", "--internal-tls-key", str(cert[1])), "--internal-tls-cert"),
    ):
        with pytest.raises(UserError, match=named):
            config(*model, *flags)


def test_internal_services_bind_loopback_or_the_nodes_own_address():
    """#28: an internal service binds the node's own address only when the cluster is not on loopback, and never
    a wildcard (it would listen on every interface)."""
    from engine.hosting import internal_host
    from engine.messages import WorkerOptions
    from kvtransfer.net import WILDCARD_HOSTS

    assert internal_host(WorkerOptions("m", "c", kv_host="127.0.0.1")) == "127.0.0.1"
    assert internal_host(WorkerOptions("m", "c", kv_host="0.0.0.0")) not in WILDCARD_HOSTS
