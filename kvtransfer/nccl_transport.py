"""GPU-to-GPU KV transfer: NCCL carries the bytes, a gRPC stream (`KVTransfer/NcclPush`) carries the rest.

Lifecycle of one send (sender = prefill worker, rank 0; receiver = decode worker, rank 1):
1. Session: on the first send to a target the sender makes an NCCL unique id and calls `NcclConnect`; both sides
   join a 2-rank communicator, which both cache and reuse for every later push between the pair.
2. Header: `NcclPush` opens with `KVChunk{transfer_id, header, nccl_session}`. The receiver checks the header
   (fingerprint, dtype, geometry, size; checksum kind "wsum64") before it allocates anything.
3. Ready: the receiver allocates one device buffer [k_bytes + v_bytes] (uint8), posts NCCL receives of K and V
   into it and answers `KVAck{ready}`. Only then does the sender enqueue its NCCL sends: a rejected header never
   leaves a send without a matching receive.
4. Commit: once its sends completed the sender sends `KVChunk{commit}`; the receiver waits for its receives,
   checks every chunk's "wsum64" on the device, calls the sink with device views (k, v) and answers the ack.
5. Failure: if the stream ends without the commit after ready, or NCCL fails, both sides abort that session's
   communicator (a posted receive may never complete otherwise); the next send opens a new one.

Memory: the sender reads the payload's device arrays in place (a host payload is staged to the device once);
the receiver's buffer is new per transfer and owned by the sink from the call on. One push per communicator at a
time (a lock per session); pushes to different receivers run concurrently.
The receiver also serves the host-memory `Push` of `grpc_transport` with the same sink, so a CPU prefill worker
can feed a GPU decode worker. Import-safe without cupy or a GPU: `CupyNccl()` raises RuntimeError there. The
control plane is independent of NCCL (`BulkBackend`), so CPU tests drive it with a host-memory backend.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from kvtransfer.auth import InternalTLS, internal_channel, token_metadata
from kvtransfer.grpc_transport import (
    COMMIT_MESSAGE,
    DEFAULT_MAX_MESSAGE_BYTES,
    GrpcKVReceiver,
    GrpcKVSender,
    _since,
    channel_options,
    decode_data_chunk,
    error_ack,
    map_rpc_error,
    read_header_message,
    run_sink,
    serve_kv,
)
from kvtransfer.nccl_backend import (  # noqa: F401 - NCCL_UNAVAILABLE, nccl_available and the id codecs are re-exported
    NCCL_UNAVAILABLE,
    BulkBackend,
    BulkLink,
    CupyNccl,
    nccl_available,
    unique_id_from_bytes,
    unique_id_to_bytes,
)
from kvtransfer.net import host_port
from kvtransfer.payload import (
    DEFAULT_CHUNK_BYTES,
    ErrorCode,
    KVHeader,
    KVPayload,
    PayloadError,
    ShapeCheck,
    build_header,
    check_header,
    make_payload,
    wsum64,
)
from kvtransfer.transport import CancelResult, ImportSink, KVReceiver, KVSender, TransferResult
from protos import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)

NCCL_SCHEME = "nccl://"
_SERVICE = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name


# ---- payloads -------------------------------------------------------------------------------------------------
def _flat_u8(a: Any) -> Any:
    return a.reshape(-1).view("uint8")


def make_device_payload(
    backend: BulkBackend,
    k: Any,
    v: Any,
    fingerprint: str,
    begin: int,
    request_id: str,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    page_size: int = 16,
    meta: bytes = b"",
) -> KVPayload:
    """A payload of device arrays k, v [layers, n, kv_heads, head_dim] (referenced, not copied) whose header
    carries per-chunk "wsum64" checksums computed on the device."""
    k, v = backend.to_device(k), backend.to_device(v)
    if k.ndim != 4 or k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"make_device_payload: k and v must share a [L, n, Hkv, d] shape and dtype, got {k.shape}")
    xp = backend.xp
    sums = [
        int(wsum64(xp, f[off : off + chunk_bytes]))
        for f in (_flat_u8(k), _flat_u8(v))
        for off in range(0, f.size, chunk_bytes)
    ]
    header = build_header(
        tuple(k.shape),
        str(k.dtype),
        fingerprint,
        begin,
        request_id,
        chunk_bytes,
        page_size,
        sums,
        checksum="wsum64",
        meta=meta,
    )
    return KVPayload(header, k, v)


def to_device_payload(backend: BulkBackend, payload: KVPayload) -> KVPayload:
    """`payload` as a "wsum64" device payload (a host payload is staged to the device once)."""
    if payload.header.checksum == "wsum64":
        return KVPayload(payload.header, backend.to_device(payload.k), backend.to_device(payload.v))
    h = payload.header
    return make_device_payload(
        backend, payload.k, payload.v, h.layout_fingerprint, h.begin, h.request_id, h.chunk_bytes, h.page_size, h.meta
    )


def split_target(target: str) -> tuple[bool, str]:
    """("nccl://host:port" -> (True, "host:port")); a plain "host:port" -> (False, itself)."""
    return (True, target[len(NCCL_SCHEME) :]) if target.startswith(NCCL_SCHEME) else (False, target)


# ---- sender ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Session:
    session_id: str
    link: BulkLink
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self, abort: bool) -> None:
        """Release the link (`abort`: an operation may be pending); failures are logged, never raised."""
        try:
            self.link.close(abort=abort)
        except Exception as e:
            log.warning("closing NCCL session %s (abort=%s): %s", self.session_id, abort, e)


class _Failed(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class NcclKVSender(KVSender):
    """`KVSender` over NCCL (see the module docstring); thread-safe. Targets are "host:port" of an
    `NcclKVReceiver` (an "nccl://" prefix is accepted)."""

    def __init__(
        self,
        backend: BulkBackend | None = None,
        connect_timeout_s: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token: str = "",
        tls: InternalTLS | None = None,
    ) -> None:
        self._backend = backend if backend is not None else CupyNccl()
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._options = channel_options(max_message_bytes)
        self._metadata = token_metadata(token)  # the cluster token on every call (kvtransfer.auth)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._sessions: dict[str, _Session] = {}
        self._connecting: dict[str, threading.Lock] = {}
        self._inflight: dict[str, set[grpc.Call]] = {}
        self._cancelled: set[str] = set()
        self._closed = False

    @property
    def backend(self) -> BulkBackend:
        return self._backend

    def _channel(self, target: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise _Failed(ErrorCode.CANCELLED, "sender is closed")
            if target not in self._channels:
                self._channels[target] = internal_channel(target, self._options, self._tls)
            return self._channels[target]

    def _session(self, target: str) -> _Session:
        """The cached session for `target`, or a new one (NcclConnect + join, concurrently)."""
        with self._lock:
            sess = self._sessions.get(target)
            gate = self._connecting.setdefault(target, threading.Lock())
        if sess is not None:
            return sess
        with gate:  # one rendezvous per target at a time
            with self._lock:
                if target in self._sessions:
                    return self._sessions[target]
            channel = self._channel(target)
            connect = channel.unary_unary(
                f"/{_SERVICE}/NcclConnect",
                request_serializer=pb.NcclHello.SerializeToString,
                response_deserializer=pb.NcclWelcome.FromString,
            )
            uid, sid = self._backend.new_unique_id(), uuid.uuid4().hex
            box: dict[str, Any] = {}

            def join() -> None:
                try:
                    box["link"] = self._backend.join(uid, 0)
                except Exception as e:
                    box["error"] = e

            # join blocks until the receiver joined; it leaks (blocked) only if the receiver never does
            joiner = threading.Thread(target=join, name="nccl-join", daemon=True)
            joiner.start()
            try:
                welcome = connect(
                    pb.NcclHello(session_id=sid, unique_id=uid),
                    timeout=self._connect_timeout_s,
                    metadata=self._metadata,
                )
            except grpc.RpcError as e:
                code, msg = map_rpc_error(e)
                raise _Failed(code, f"NcclConnect failed: {msg}") from None
            if not welcome.ok:
                raise _Failed(ErrorCode.UNAVAILABLE, f"NcclConnect refused: {welcome.message}")
            joiner.join(self._connect_timeout_s)
            if "link" not in box:
                raise _Failed(ErrorCode.UNAVAILABLE, f"NCCL join failed: {box.get('error', 'timed out')}")
            sess = _Session(sid, box["link"])
            with self._lock:
                self._sessions[target] = sess
            return sess

    def _drop(self, target: str, sess: _Session) -> None:
        with self._lock:
            if self._sessions.get(target) is sess:
                del self._sessions[target]
        sess.close(abort=True)

    def send(self, payload: KVPayload, target: str, timeout_s: float) -> TransferResult:
        t0 = time.perf_counter()
        target = split_target(target)[1]
        rid = payload.header.request_id
        try:
            payload = to_device_payload(self._backend, payload)
            sess = self._session(target)
        except _Failed as e:
            return TransferResult.failure(e.code, e.message, 0, _since(t0))
        except Exception as e:
            return TransferResult.failure(ErrorCode.UNAVAILABLE, f"{type(e).__name__}: {e}", 0, _since(t0))
        with sess.lock:
            return self._push(payload, target, sess, rid, max(timeout_s - _since(t0), 0.001), t0)

    def _push(
        self, payload: KVPayload, target: str, sess: _Session, rid: str, timeout_s: float, t0: float
    ) -> TransferResult:
        out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

        def requests() -> Iterator[bytes]:
            while (m := out.get()) is not None:
                yield m

        push = self._channel(target).stream_stream(
            f"/{_SERVICE}/NcclPush", request_serializer=None, response_deserializer=pb.KVAck.FromString
        )
        call = push(requests(), timeout=timeout_s, metadata=self._metadata)
        with self._lock:
            self._inflight.setdefault(rid, set()).add(call)
        sent = False
        try:
            transfer_id = f"{rid}/{uuid.uuid4().hex[:12]}"
            out.put(
                pb.KVChunk(
                    transfer_id=transfer_id, header=payload.header.to_bytes(), nccl_session=sess.session_id
                ).SerializeToString()
            )
            first = next(call, None)
            if first is None:
                raise _Failed(ErrorCode.UNAVAILABLE, "receiver closed the stream without an answer")
            if not first.ready:  # rejected before any receive was posted: the session stays healthy
                out.put(None)
                return TransferResult(False, ErrorCode.parse(first.error_code), first.message, 0, _since(t0))
            if self._take_cancel(rid):
                raise _Failed(ErrorCode.CANCELLED, "cancelled")
            sess.link.send([_flat_u8(payload.k), _flat_u8(payload.v)])
            sent = True
            out.put(COMMIT_MESSAGE)
            out.put(None)
            ack = next(call, None)
            if ack is None:
                raise _Failed(ErrorCode.UNAVAILABLE, "receiver closed the stream without an ack")
        except _Failed as e:
            out.put(None)
            call.cancel()
            self._drop(target, sess)
            return TransferResult.failure(e.code, e.message, payload.header.total_bytes if sent else 0, _since(t0))
        except grpc.RpcError as e:
            out.put(None)
            self._drop(target, sess)
            code, msg = map_rpc_error(e)
            return TransferResult.failure(code, msg, 0, _since(t0))
        except Exception as e:  # NCCL errors
            out.put(None)
            call.cancel()
            self._drop(target, sess)
            return TransferResult.failure(ErrorCode.UNAVAILABLE, f"{type(e).__name__}: {e}", 0, _since(t0))
        finally:
            with self._lock:
                calls = self._inflight.get(rid, set())
                calls.discard(call)
                if not calls:
                    self._inflight.pop(rid, None)
                    self._cancelled.discard(rid)
        if ack.ok:
            return TransferResult(True, None, "", ack.bytes_received, _since(t0), ack.import_s)
        return TransferResult(
            False, ErrorCode.parse(ack.error_code), ack.message, ack.bytes_received, _since(t0), ack.import_s
        )

    def _take_cancel(self, rid: str) -> bool:
        with self._lock:
            return rid in self._cancelled

    def cancel(self, request_id: str) -> CancelResult:
        """Marks the request: its push stops before the NCCL send (withholding the commit, so nothing is imported
        and the session is rebuilt); a send already under way is not interrupted and completes normally."""
        with self._lock:
            calls = list(self._inflight.get(request_id, ()))
            if calls:
                self._cancelled.add(request_id)
        return CancelResult.REQUESTED if calls else CancelResult.NOT_FOUND

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
            channels, self._channels = list(self._channels.values()), {}
            calls = [c for cs in self._inflight.values() for c in cs]
        for c in calls:
            c.cancel()
        for s in sessions:
            s.close(abort=bool(calls))
        for ch in channels:
            ch.close()


# ---- receiver -------------------------------------------------------------------------------------------------
class NcclKVReceiver(KVReceiver):
    """`KVReceiver` for the NCCL path, plus the host `Push` of `GrpcKVReceiver` on the same server and sink.

    The sink gets device arrays (k, v) from NcclPush and numpy arrays from Push. Checks and `on_orphaned` behave
    as in `GrpcKVReceiver`. `start()` returns "host:port"; `advertised` is "nccl://host:port", the target the
    decode worker publishes so that GPU prefill workers pick the NCCL path.
    """

    def __init__(
        self,
        sink: ImportSink,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: BulkBackend | None = None,
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
        self._backend = backend if backend is not None else CupyNccl()
        self._token = token
        self._tls = tls
        self._host_rx = GrpcKVReceiver(  # validates host and max_concurrent
            sink,
            host=host,
            port=port,
            max_concurrent=max_concurrent,
            expected_fingerprint=expected_fingerprint,
            expected_dtype=expected_dtype,
            shape_check=shape_check,
            max_payload_bytes=max_payload_bytes,
            max_message_bytes=max_message_bytes,
            on_orphaned=on_orphaned,
        )
        self._sink, self._on_orphaned = sink, on_orphaned
        self._expect = (expected_fingerprint, expected_dtype, shape_check, max_payload_bytes)
        self._host, self._port, self._max_concurrent = host, port, max_concurrent
        self._options = channel_options(max_message_bytes)
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._server: grpc.Server | None = None
        self.address: str | None = None

    @property
    def advertised(self) -> str:
        if self.address is None:
            raise RuntimeError("receiver not started")
        return NCCL_SCHEME + self.address

    def start(self) -> str:
        if self._server is not None:
            raise RuntimeError("receiver already started")
        handlers = {
            **self._host_rx.handlers(),
            "NcclConnect": grpc.unary_unary_rpc_method_handler(
                self._connect,
                request_deserializer=pb.NcclHello.FromString,
                response_serializer=pb.NcclWelcome.SerializeToString,
            ),
            "NcclPush": grpc.stream_stream_rpc_method_handler(
                self._nccl_push, request_deserializer=None, response_serializer=pb.KVAck.SerializeToString
            ),
        }
        bind = host_port(self._host, self._port)
        # each transfer holds a worker thread, and so does each rendezvous in progress
        self._server, self.address = serve_kv(
            handlers, self._host, bind, self._max_concurrent + 2, self._options, self._token, self._tls
        )
        return self.address

    def stop(self, grace_s: float | None = None) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close(abort=True)

    def _connect(self, hello: pb.NcclHello, context: grpc.ServicerContext) -> pb.NcclWelcome:
        if not hello.session_id or len(hello.unique_id) == 0:
            return pb.NcclWelcome(ok=False, message="session_id and unique_id are required")
        try:
            link = self._backend.join(bytes(hello.unique_id), 1)
        except Exception as e:
            return pb.NcclWelcome(ok=False, message=f"NCCL join failed: {type(e).__name__}: {e}")
        with self._lock:
            self._sessions[hello.session_id] = _Session(hello.session_id, link)
        return pb.NcclWelcome(ok=True)

    def _drop(self, sess: _Session) -> None:
        with self._lock:
            if self._sessions.get(sess.session_id) is sess:
                del self._sessions[sess.session_id]
        sess.close(abort=True)

    def _nccl_push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.KVAck]:
        """header -> checks -> post receives -> ready -> commit -> wait, verify -> sink -> ack."""
        transfer_id = ""
        try:
            msg = read_header_message(next(requests, None))
            transfer_id = msg.transfer_id
            header = KVHeader.from_bytes(msg.header)
            check_header(header, *self._expect)
            if header.checksum != "wsum64":
                raise PayloadError(ErrorCode.MALFORMED, f"NcclPush needs wsum64 checksums, got {header.checksum}")
            with self._lock:
                sess = self._sessions.get(msg.nccl_session)
            if sess is None:
                raise PayloadError(ErrorCode.UNAVAILABLE, f"unknown NCCL session {msg.nccl_session!r}")
        except PayloadError as e:
            yield error_ack(e.code, e.message, transfer_id)
            return
        except grpc.RpcError:
            return
        with sess.lock:
            yield from self._receive(header, sess, requests, context, transfer_id)

    def _receive(
        self,
        header: KVHeader,
        sess: _Session,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        transfer_id: str,
    ) -> Iterator[pb.KVAck]:
        try:
            buf = self._backend.empty(header.total_bytes)  # [k_bytes + v_bytes]
            sess.link.post_recv([buf[: header.k_bytes], buf[header.k_bytes :]])
        except Exception as e:
            self._drop(sess)
            yield error_ack(
                ErrorCode.UNAVAILABLE, f"posting the NCCL receive failed: {type(e).__name__}: {e}", transfer_id
            )
            return
        settled = False  # False while a posted receive may still be pending
        try:
            # gRPC stops driving this generator (closes it at this yield) if the sender cancels now
            yield pb.KVAck(ready=True, transfer_id=transfer_id)
            try:
                nxt = next(requests, None)
                committed = nxt is not None and decode_data_chunk(nxt) is None
            except (grpc.RpcError, PayloadError):
                committed = False
            if not committed:  # the sender gave up: its send may never come, so the receive may never complete
                yield error_ack(ErrorCode.TRUNCATED, "stream ended without the commit (sender cancelled?)", transfer_id)
                return
            try:
                sess.link.wait_recv()
            except Exception as e:
                yield error_ack(ErrorCode.UNAVAILABLE, f"NCCL receive failed: {type(e).__name__}: {e}", transfer_id)
                return
            settled = True
        finally:
            if not settled:
                self._drop(sess)
        try:
            xp = self._backend.xp
            for i, (off, size) in enumerate(header.chunk_spans()):
                if int(wsum64(xp, buf[off : off + size])) != header.chunk_checksums[i]:
                    raise PayloadError(ErrorCode.CHECKSUM_MISMATCH, f"chunk {i} fails its wsum64 check")
        except PayloadError as e:
            yield error_ack(e.code, e.message, transfer_id, header.total_bytes)
            return
        k = buf[: header.k_bytes].view(header.dtype).reshape(header.shape)
        v = buf[header.k_bytes :].view(header.dtype).reshape(header.shape)
        yield run_sink(self._sink, header, k, v, context, transfer_id, header.total_bytes, self._on_orphaned)


# ---- routing ------------------------------------------------------------------------------------------------
class RoutedSender(KVSender):
    """The prefill worker's sender: "nccl://" targets go over NCCL when this worker has an `NcclKVSender`
    (its KV is on CUDA), every other target over the host gRPC `Push` (which NCCL receivers also serve)."""

    def __init__(self, grpc_sender: GrpcKVSender, nccl_sender: NcclKVSender | None = None) -> None:
        self.grpc, self.nccl = grpc_sender, nccl_sender

    def uses_nccl(self, target: str) -> bool:
        return self.nccl is not None and split_target(target)[0]

    def send(self, payload: KVPayload, target: str, timeout_s: float) -> TransferResult:
        if self.uses_nccl(target):
            assert self.nccl is not None
            return self.nccl.send(payload, target, timeout_s)
        if payload.header.checksum != "xxh3_64":  # a device payload on the host path: copy it to host once
            h = payload.header
            host = [np.asarray(a.get() if hasattr(a, "get") else a) for a in (payload.k, payload.v)]
            payload = make_payload(
                *host, h.layout_fingerprint, h.begin, h.request_id, h.chunk_bytes, h.page_size, h.meta
            )
        return self.grpc.send(payload, split_target(target)[1], timeout_s)

    def cancel(self, request_id: str) -> CancelResult:
        results = [s.cancel(request_id) for s in (self.grpc, self.nccl) if s is not None]
        return CancelResult.REQUESTED if CancelResult.REQUESTED in results else CancelResult.NOT_FOUND

    def close(self) -> None:
        self.grpc.close()
        if self.nccl is not None:
            self.nccl.close()
