"""KV transfer over gRPC (`pdserve.v1.KVTransfer/Push`, client streaming): host memory, any two processes.

Stream: one `KVChunk{transfer_id, header}` message, one `KVChunk{index, data}` per payload chunk (see
`payload.py` for the chunk layout), then `KVChunk{commit}` and half-close; the server answers one `KVAck` after
the import. A stream that ends without the commit imports nothing (gRPC's Python server cannot always tell a
client's cancel from its half-close, so the commit is the sender's explicit point of no return). Data messages are
encoded/decoded here by hand (valid protobuf wire format for `KVChunk`, so any protobuf client interoperates)
to save two copies per chunk: the sender's only copy is joining the tag bytes with the chunk view; the receiver
makes none for slab-aligned payloads (the import reads per-layer views of the received messages) and one, into
the `PayloadAssembler` buffer, for others. Servers bind loopback/explicit hosts only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kvtransfer.auth import InternalTLS, TokenInterceptor, internal_channel, token_metadata
from kvtransfer.net import WILDCARD_HOSTS, host_port, message_limits
from kvtransfer.payload import (
    ErrorCode,
    KVHeader,
    KVPayload,
    PayloadAssembler,
    PayloadError,
    ShapeCheck,
    iter_chunks,
)
from kvtransfer.transport import CancelResult, ImportSink, KVReceiver, KVSender, TransferResult
from protos import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["KVTransfer"]
PUSH_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Push'].name}"  # "/pdserve.v1.KVTransfer/Push"
DEFAULT_MAX_MESSAGE_BYTES = 80 << 20  # > payload.MAX_CHUNK_BYTES + framing


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for both ends of a KV channel: message limits above the largest chunk, 16 MiB HTTP/2 frames (a
    1 MiB chunk then crosses as one DATA frame instead of 64), and TCP reads of up to 16 MiB at a time.

    Measured with `python -m kvtransfer.bench_transport` (two processes, 24 MiB, 1 MiB chunks; noisy): a bare
    stream moved 2100-2600 MiB/s with gRPC's defaults and 2400-2800 MiB/s with these; a 32 MiB stream lookahead,
    a larger write buffer or disabling BDP probing did not help.
    """
    return [
        *message_limits(max_message_bytes),
        ("grpc.http2.max_frame_size", (16 << 20) - 1),  # the HTTP/2 maximum
        ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
        ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
    ]


# ---- KVChunk data-message wire codec (field 3: uint32 index, field 4: bytes data) ---------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_data_chunk(index: int, data: memoryview) -> bytes:
    """Serialized `KVChunk(index=index, data=data)`; copies `data` once (gRPC needs one bytes object)."""
    return b"".join((b"\x18", _varint(index), b"\x22", _varint(len(data)), data))


def _read_varint(mv: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(mv) and shift < 64:
        b = mv[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


COMMIT_MESSAGE = pb.KVChunk(commit=True).SerializeToString()


def decode_data_chunk(msg: bytes) -> tuple[int, memoryview] | None:
    """(index, zero-copy view of data) of a serialized data `KVChunk`; None for the commit message.

    Anything else (header fields, data and commit together) raises `PayloadError(MALFORMED)`.
    """
    if msg == COMMIT_MESSAGE:
        return None
    mv = memoryview(msg)
    try:
        pos, index = 0, 0
        if len(mv) and mv[0] == 0x18:
            index, pos = _read_varint(mv, 1)
        if pos < len(mv) and mv[pos] == 0x22:
            size, pos = _read_varint(mv, pos + 1)
            if pos + size == len(mv):
                return index, mv[pos:]
    except ValueError:
        pass
    try:  # slow path: other field order, unknown fields, empty data, ... (copies data once more)
        parsed = pb.KVChunk.FromString(msg)
    except DecodeError as e:
        raise PayloadError(ErrorCode.MALFORMED, f"undecodable data message: {e}") from None
    if parsed.header or parsed.transfer_id:
        raise PayloadError(ErrorCode.MALFORMED, "header fields set on a data message")
    if parsed.commit:
        if parsed.data or parsed.index:
            raise PayloadError(ErrorCode.MALFORMED, "commit message carries data")
        return None
    return parsed.index, memoryview(parsed.data)


# ---- sender -------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _InFlight:
    """Mutable per-send state shared between the caller's thread and gRPC's request-iterator thread."""

    request_id: str
    cancel: threading.Event
    call: grpc.Future | None = None
    sent_bytes: int = 0
    committed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request_cancel(self) -> None:
        self.cancel.set()
        with self.lock:
            call = self.call
        if call is not None:
            call.cancel()


class GrpcKVSender(KVSender):
    """`KVSender` over gRPC: one cached channel per target, thread-safe, never raises for remote errors.

    `on_chunk(request_id, index)`, if set, is called on gRPC's request thread before each data chunk is sent
    (diagnostics and tests, e.g. cancelling mid-transfer).
    """

    def __init__(
        self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str = "", tls: InternalTLS | None = None
    ) -> None:
        self._options = channel_options(max_message_bytes)
        self._metadata = token_metadata(token)  # the cluster token (kvtransfer.auth)
        self._tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, grpc.StreamUnaryMultiCallable]] = {}
        self._inflight: dict[str, set[_InFlight]] = {}
        self._closed = False
        self.on_chunk: Callable[[str, int], None] | None = None

    def _push_callable(self, target: str) -> grpc.StreamUnaryMultiCallable:
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            if target not in self._channels:
                ch = internal_channel(target, self._options, self._tls)
                push = ch.stream_unary(PUSH_METHOD, request_serializer=None, response_deserializer=pb.KVAck.FromString)
                self._channels[target] = (ch, push)
            return self._channels[target][1]

    def _requests(self, payload: KVPayload, st: _InFlight) -> Iterator[bytes]:
        """Runs on gRPC's request thread: header, data chunks, commit; on cancel it stops before the commit."""
        transfer_id = f"{payload.header.request_id}/{uuid.uuid4().hex[:12]}"
        yield pb.KVChunk(transfer_id=transfer_id, header=payload.header.to_bytes()).SerializeToString()
        hook = self.on_chunk
        for i, chunk in enumerate(iter_chunks(payload)):
            if hook is not None:
                hook(payload.header.request_id, i)
            if st.cancel.is_set():
                st.request_cancel()
                return
            yield encode_data_chunk(i, chunk)
            st.sent_bytes += len(chunk)
        if st.cancel.is_set():
            st.request_cancel()
            return
        st.committed = True
        yield COMMIT_MESSAGE

    def send(
        self, payload: KVPayload, target: str, timeout_s: float, cancel: threading.Event | None = None
    ) -> TransferResult:
        """Push `payload` to `target` ("host:port"); blocks until acked, failed, timed out or cancelled.

        Cancel with `cancel(request_id)` from another thread, or by setting `cancel` (polled every 20 ms).
        """
        t0 = time.perf_counter()
        st = _InFlight(payload.header.request_id, cancel if cancel is not None else threading.Event())
        try:
            push = self._push_callable(target)
        except RuntimeError as e:
            return TransferResult.failure(ErrorCode.CANCELLED, str(e))
        with self._lock:
            self._inflight.setdefault(st.request_id, set()).add(st)
        try:
            try:
                call = push.future(self._requests(payload, st), timeout=timeout_s, metadata=self._metadata)
            except ValueError as e:  # the channel was closed by a concurrent close()
                return TransferResult.failure(ErrorCode.CANCELLED, str(e), 0, _since(t0))
            with st.lock:
                st.call = call
            if st.cancel.is_set():
                call.cancel()
            ack = self._wait(call, st, poll=cancel is not None)
        except grpc.FutureCancelledError:
            msg = "cancelled after the commit: the receiver may have imported it" if st.committed else "cancelled"
            return TransferResult.failure(ErrorCode.CANCELLED, msg, st.sent_bytes, _since(t0))
        except grpc.RpcError as e:
            code, msg = map_rpc_error(e)
            if st.cancel.is_set():
                code = ErrorCode.CANCELLED
            return TransferResult.failure(code, msg, st.sent_bytes, _since(t0))
        finally:
            with self._lock:
                peers = self._inflight.get(st.request_id, set())
                peers.discard(st)
                if not peers:
                    self._inflight.pop(st.request_id, None)
        if ack.ok:
            return TransferResult(True, None, "", ack.bytes_received, _since(t0), ack.import_s)
        code = ErrorCode.CANCELLED if st.cancel.is_set() else ErrorCode.parse(ack.error_code)
        return TransferResult(False, code, ack.message, ack.bytes_received, _since(t0), ack.import_s)

    @staticmethod
    def _wait(call: grpc.Future, st: _InFlight, poll: bool) -> pb.KVAck:
        if not poll:
            return call.result()
        while True:
            try:
                return call.result(timeout=0.02)
            except grpc.FutureTimeoutError:
                if st.cancel.is_set():
                    call.cancel()

    def cancel(self, request_id: str) -> CancelResult:
        with self._lock:
            targets = list(self._inflight.get(request_id, ()))
        for st in targets:
            st.request_cancel()
        return CancelResult.REQUESTED if targets else CancelResult.NOT_FOUND

    def close(self) -> None:
        with self._lock:
            self._closed = True
            inflight = [st for peers in self._inflight.values() for st in peers]
            channels, self._channels = list(self._channels.values()), {}
        for st in inflight:
            st.request_cancel()
        for ch, _ in channels:
            ch.close()


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def map_rpc_error(e: grpc.RpcError) -> tuple[ErrorCode, str]:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    msg = f"{code.name if code else 'RPC error'}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ErrorCode.TIMEOUT, msg
    if code == grpc.StatusCode.CANCELLED:
        return ErrorCode.CANCELLED, msg
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (ErrorCode.MALFORMED if "larger than max" in details else ErrorCode.BUSY), msg
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ErrorCode.UNAUTHENTICATED, msg
    return ErrorCode.UNAVAILABLE, msg


# ---- receiver -----------------------------------------------------------------------------------------------
class GrpcKVReceiver(KVReceiver):
    """`KVReceiver` as a gRPC server on `host:port` (port 0: any free port; `start()` returns the address).

    At most `max_concurrent` transfers run at once (each holds one worker thread and one payload buffer);
    further ones are refused at once with RESOURCE_EXHAUSTED, which senders report as BUSY. The header is
    checked (format, then `expected_fingerprint`, `expected_dtype`, `shape_check`, `max_payload_bytes`) before
    any data is read; data is verified chunk by chunk; the sink runs only on a complete, committed payload whose
    sender is still connected. If the sender is found gone after the sink ran, `on_orphaned(header)` is called
    (on the same thread) so the decode worker can drop the imported KV.
    """

    def __init__(
        self,
        sink: ImportSink,
        host: str = "127.0.0.1",
        port: int = 0,
        max_concurrent: int = 4,
        expected_fingerprint: str | None = None,
        expected_dtype: str | None = None,
        shape_check: ShapeCheck | None = None,
        max_payload_bytes: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_orphaned: Callable[[KVHeader], None] | None = None,
        token: str = "",
        tls: InternalTLS | None = None,
    ) -> None:
        if host in WILDCARD_HOSTS:
            raise ValueError(f"refusing to bind the wildcard address {host!r}; give an explicit host")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self._sink = sink
        self._bind = host_port(host, port)
        self._host = host
        self._max_concurrent = max_concurrent
        self._expect = (expected_fingerprint, expected_dtype, shape_check, max_payload_bytes)
        self._options = channel_options(max_message_bytes)
        self._on_orphaned = on_orphaned
        self._token = token  # required of every call when set (kvtransfer.auth)
        self._tls = tls
        self._server: grpc.Server | None = None
        self.address: str | None = None

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The `KVTransfer` methods this receiver serves (another receiver may host them on its server)."""
        return {
            "Push": grpc.stream_unary_rpc_method_handler(
                self._push, request_deserializer=None, response_serializer=pb.KVAck.SerializeToString
            )
        }

    def start(self) -> str:
        if self._server is not None:
            raise RuntimeError("receiver already started")
        self._server, self.address = serve_kv(
            self.handlers(), self._host, self._bind, self._max_concurrent, self._options, self._token, self._tls
        )
        return self.address

    def stop(self, grace_s: float | None = None) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()

    def _push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.KVAck:
        """One transfer, on a server worker thread: header -> chunks -> sink -> ack (or an error ack)."""
        transfer_id, asm = "", None
        try:
            msg = read_header_message(next(requests, None))
            transfer_id = msg.transfer_id
            header = KVHeader.from_bytes(msg.header)
            asm = PayloadAssembler(header, *self._expect)
            committed = False
            for raw in requests:
                chunk = decode_data_chunk(raw)
                if committed:
                    raise PayloadError(ErrorCode.MALFORMED, "message after the commit")
                if chunk is None:
                    committed = True
                else:
                    asm.add(*chunk)
            k, v = asm.finish()  # TRUNCATED if chunks are missing, committed or not
            if not committed:
                raise PayloadError(ErrorCode.TRUNCATED, "stream ended without the commit (sender cancelled?)")
            return run_sink(self._sink, header, k, v, context, transfer_id, asm.bytes_received, self._on_orphaned)
        except PayloadError as e:
            log.info("kv transfer %s rejected: %s", transfer_id, e)
            return error_ack(e.code, e.message, transfer_id, _received(asm))
        except grpc.RpcError:  # the sender cancelled, disconnected or ran past its deadline mid-stream
            remaining = context.time_remaining()
            code = ErrorCode.TIMEOUT if remaining is not None and remaining <= 0 else ErrorCode.CANCELLED
            return error_ack(code, "stream aborted by the sender", transfer_id, _received(asm))
        except Exception as e:  # a bug here or in shape_check: answer instead of failing the RPC opaquely
            log.exception("kv transfer %s: receiver error", transfer_id)
            return error_ack(
                ErrorCode.UNAVAILABLE, f"receiver error: {type(e).__name__}: {e}", transfer_id, _received(asm)
            )


def read_header_message(first: bytes | None) -> pb.KVChunk:
    """The stream's first `KVChunk` (it must carry a header and no data); `PayloadError` otherwise."""
    if first is None:
        raise PayloadError(ErrorCode.TRUNCATED, "stream closed before the header")
    try:
        msg = pb.KVChunk.FromString(first)
    except DecodeError as e:
        raise PayloadError(ErrorCode.MALFORMED, f"undecodable header message: {e}") from None
    if not msg.header or msg.data:
        raise PayloadError(ErrorCode.MALFORMED, "first message must carry the header and no data")
    return msg


def serve_kv(
    handlers: dict[str, grpc.RpcMethodHandler],
    host: str,
    bind: str,
    max_concurrent: int,
    options: list,
    token: str = "",
    tls: InternalTLS | None = None,
) -> tuple[grpc.Server, str]:
    """Start a `KVTransfer` server with `handlers` on `bind` (every call must carry `token` when it is set; TLS
    with `tls`); returns it and the address senders use."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="kv-recv"),
        options=options,
        maximum_concurrent_rpcs=max_concurrent,
        interceptors=[TokenInterceptor(token)] if token else None,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    try:
        port = server.add_secure_port(bind, tls.server_credentials()) if tls else server.add_insecure_port(bind)
    except RuntimeError as e:
        raise OSError(f"cannot bind {bind}: {e}") from None
    if port == 0:
        raise OSError(f"cannot bind {bind}")
    server.start()
    return server, host_port(host, port)


def run_sink(
    sink: ImportSink,
    header: KVHeader,
    k: Any,
    v: Any,
    context: grpc.ServicerContext,
    transfer_id: str,
    bytes_received: int,
    on_orphaned: Callable[[KVHeader], None] | None,
) -> pb.KVAck:
    """Import a complete, verified, committed payload and build the ack; shared by every receiver.

    Skips the import when the sender is already gone; calls `on_orphaned(header)` when it left during the import.
    """
    if not context.is_active():
        return error_ack(ErrorCode.CANCELLED, "sender went away before the import", transfer_id, bytes_received)
    t0 = time.perf_counter()
    try:
        sink(header, k, v)
    except PayloadError as e:  # the sink's own rejection (e.g. SHAPE_MISMATCH for a range gap) keeps its code
        log.info("kv import of %s rejected by the sink: %s", header.request_id, e)
        return error_ack(e.code, e.message, transfer_id, bytes_received, _since(t0))
    except Exception as e:
        log.warning("kv import of %s failed: %s: %s", header.request_id, type(e).__name__, e)
        return error_ack(ErrorCode.IMPORT_FAILED, f"{type(e).__name__}: {e}", transfer_id, bytes_received, _since(t0))
    import_s = _since(t0)
    remaining = context.time_remaining()  # a passed deadline means the sender (deadline <= ours) gave up
    gone = not context.is_active() or (remaining is not None and remaining <= 0)
    if gone and on_orphaned is not None:
        with contextlib.suppress(Exception):
            on_orphaned(header)
    return pb.KVAck(ok=True, bytes_received=bytes_received, import_s=import_s, transfer_id=transfer_id)


def _received(asm: PayloadAssembler | None) -> int:
    return asm.bytes_received if asm is not None else 0


def error_ack(code: ErrorCode, message: str, transfer_id: str, received: int = 0, import_s: float = 0.0) -> pb.KVAck:
    """A failed `KVAck` (`received`: payload bytes taken before the failure)."""
    return pb.KVAck(
        ok=False,
        error_code=code.value,
        message=message,
        bytes_received=received,
        import_s=import_s,
        transfer_id=transfer_id,
    )
