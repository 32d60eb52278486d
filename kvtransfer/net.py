"""Network helpers every gRPC end of pdserve shares: `host:port` formatting and message-size limits.

The KV channel adds its own frame and read-size tuning on top (`grpc_transport.channel_options`)."""

from __future__ import annotations

API_MAX_MESSAGE_BYTES = 64 << 20  # the generate API's limit, both ends
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a server started next; tests and launched benchmarks)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets (`[::1]:50051`)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def message_limits(max_message_bytes: int = API_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options raising the send and receive message limits (set them on both ends)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
